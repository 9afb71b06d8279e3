"""Where a run stands and the counters it logs: a checkpoint's `train_state.json`. The
model, optimizer, scaler and RNG states are `accelerator.save_state`'s; the update policy, the
EMA and the training split's position save their own (training/checkpoint.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainState:
    epoch: int = 1
    batch_in_epoch: int = 0  # batches of `epoch` already trained (mid-epoch checkpoints)
    # optimizer steps (accumulation boundaries), applied or skipped: the x-axis of every log row
    opt_step: int = 0
    skipped_samples: int = 0  # bad samples dropped by data.on_error=skip
    # Training samples drawn on all ranks together (repeats of data.drop_last=false count):
    # the x-axis that lines up runs of different batch sizes and process counts.
    samples_seen: int = 0
    # What the shard transports redid, all ranks together: attempts after a failed read, and
    # bytes received then thrown away (W&B's data/retries, data/refetched_bytes).
    data_retries: int = 0
    data_refetched_bytes: int = 0
    # The lowest val (else test) negative ELBO so far and where it came (split, value, step,
    # epoch, samples_seen): W&B's best/* summary entries.
    best: dict[str, Any] = field(default_factory=dict)
    # The current epoch's metric sums so far, summed over ranks (mid-epoch checkpoints).
    epoch_sums: dict[str, list[float]] = field(default_factory=dict)
    # An epoch-end checkpoint is taken before the epoch is evaluated, so that a failed or
    # killed evaluation does not cost the epoch's training: the epoch, its train sums and
    # seconds, until its metrics.jsonl row says it was evaluated (training/loop.py).
    unevaluated: dict[str, Any] = field(default_factory=dict)
    # Goodput: the seconds of training whose steps this state holds (what a restart redid,
    # checkpoint writes, evaluation and time down are not in it), and the wall-clock time
    # (Unix seconds) the run first started.
    productive_s: float = 0.0
    started_at: float = 0.0

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, values: dict[str, Any]) -> None:
        """Every field from `values` (a field it lacks keeps its default; keys of other
        versions are ignored)."""
        fresh = TrainState()
        for f in dataclasses.fields(self):
            setattr(self, f.name, values.get(f.name, getattr(fresh, f.name)))
