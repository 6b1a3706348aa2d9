"""Stage 2: train the projector and the unfrozen GPT-2 blocks from a feature cache alone.

- `config.py`: `TrainConfig`, every training setting;
- `train.py`: `train`, which sets a run up and fits it, one named step after another;
- `data.py`: the captions of a cache, tokenized and memory-mapped, as batches;
- `objectives.py`: `Objective`, the interface of an objective, and cross-entropy on captions;
  `scst.py`: self-critical training;
- `optimization.py`: AdamW, the learning-rate schedule and the grad scaler;
- `loop.py`: `train_one_epoch` and its parts (a micro-batch, the read-back of the losses);
- `validation.py`: the val loss, CIDEr-D and BERTScore after each epoch;
- `state.py`: `TrainState`, how far a run has got, and the random number generators' states;
- `run_dir.py`: the run directory's checks and writes, and checkpoints during training;
- `plots.py`: PNG curves drawn from a run's `metrics.jsonl`.
"""
