"""PNG training curves drawn from a run's `metrics.jsonl`."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

from clipcap_cache.files import atomic_path  # noqa: E402
from clipcap_cache.logs import read_jsonl  # noqa: E402


def plot_metrics(metrics_file: str | Path, out_dir: str | Path) -> list[Path]:
    """Draw each panel whose metrics the run has, one PNG per panel; returns the files written.

    Loss and val CIDEr-D for every run; BERTScore when it was computed; under self-critical
    training, the mean sample reward (and its terms) and the mean sampled caption length.
    """
    rows = read_jsonl(metrics_file)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    epochs = [row["epoch"] for row in rows]
    written = []
    panels = {
        "loss.png": ("Loss", [("train_loss", "train"), ("val_loss", "val")]),
        "bertscore.png": (
            "BERTScore",
            [
                ("bertscore_precision", "precision"),
                ("bertscore_recall", "recall"),
                ("bertscore_f1", "F1"),
            ],
        ),
        "cider.png": ("CIDEr-D", [("val_cider", "val, greedy captions")]),
        "reward.png": (
            "Reward",
            [
                ("reward", "mean sample reward"),
                ("reward_cider", "CIDEr-D term"),
                ("reward_clip", "CLIP-S term"),
            ],
        ),
        "sample_length.png": ("Tokens", [("sample_length", "mean sampled caption length")]),
    }
    for filename, (title, series) in panels.items():
        present = [
            (key, label) for key, label in series if any(row.get(key) is not None for row in rows)
        ]
        if not present:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, label in present:
            points = [
                (e, row[key])
                for e, row in zip(epochs, rows, strict=True)
                if row.get(key) is not None
            ]
            ax.plot(*zip(*points, strict=True), marker="o", label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(title)
        ax.set_title(f"{title} per epoch")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / filename
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)
        written.append(path)
    return written
