"""`TrainConfig`: every training setting, checked where it is built, saved as the run's `config.json`."""

from dataclasses import dataclass

from clipcap_cache.checks import at_least, check_types, one_of, positive
from clipcap_cache.devices import DEVICES, PRECISIONS
from clipcap_cache.errors import ClipcapError
from clipcap_cache.training import scst

OBJECTIVES = ("xe", "scst")


@dataclass
class TrainConfig:
    """Training settings; saved with the model config as the run's `config.json`."""

    features: str  # the HDF5 feature cache to train on
    out: str  # the run directory
    val_features: str | None = None  # validate on every image of this cache instead of `val`
    validate: bool = True  # run validation each epoch
    epochs: int = 10
    batch_size: int = 40
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-5
    warmup_steps: int = 5000  # linear warmup, then linear decay to zero
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    max_caption_tokens: int = 40  # longer captions are truncated (EOS still appended)
    # Batch captions of similar length together (`batches.epoch_order`); off, so that runs and
    # resumes of runs made before it keep their order.
    group_by_length: bool = False
    device: str = "auto"
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    seed: int = 42
    eval_images: int = 500  # val images captioned each epoch for CIDEr-D and BERTScore
    bertscore: bool = True
    bertscore_model: str = "roberta-large"
    bertscore_layers: int | None = None  # needed for models bert-score does not know
    save_every_steps: int = 1000  # optimizer steps between mid-epoch resume points; 0 = epoch ends
    compile: bool = False  # torch.compile the model
    init: str | None = None  # start a new run from this checkpoint's weights (ignored on resume)
    objective: str = "xe"  # xe (cross-entropy) | scst (self-critical, see scst.py)
    samples: int = 5  # scst: captions sampled per image
    baseline: str = "mean"  # scst: mean (of the image's other samples) | greedy
    reward: str = "cider"  # scst: cider | clip | cider+clip
    cider_weight: float = 1.0  # scst: weight of CIDEr-D in cider+clip
    clip_weight: float = 1.0  # scst: weight of CLIP-S in cider+clip
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self):
        check_types(self)
        at_least(self, 1, "epochs", "batch_size", "grad_accum", "max_caption_tokens")
        at_least(self, 1, "bertscore_layers", "samples")
        at_least(self, 0, "warmup_steps", "eval_images", "save_every_steps", "weight_decay")
        at_least(self, 0, "cider_weight", "clip_weight")
        positive(self, "lr", "max_grad_norm")
        one_of(self, "device", DEVICES)
        one_of(self, "precision", PRECISIONS)
        one_of(self, "objective", OBJECTIVES)
        one_of(self, "baseline", scst.BASELINES)
        one_of(self, "reward", scst.REWARDS)
        if self.objective == "scst":
            if self.baseline == "mean" and self.samples < 2:
                raise ClipcapError("--baseline mean needs --samples 2 or more")
            if self.reward == "cider+clip" and self.cider_weight + self.clip_weight == 0:
                raise ClipcapError("--cider-weight and --clip-weight are both 0: no reward left")
            if self.validate and self.eval_images == 0:
                raise ClipcapError(
                    "--objective scst keeps the checkpoint with the best val CIDEr-D of greedy "
                    "captions: --eval-images must be at least 1 (or pass --no-val)"
                )
        if self.resume and self.overwrite:
            raise ClipcapError("--resume and --overwrite contradict each other: choose one")
