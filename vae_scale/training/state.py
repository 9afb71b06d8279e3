"""What a resumed run needs beyond the model, optimizer, scaler and RNG states (which
`accelerator.save_state` keeps): where it stands, and the counters it logs."""

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
    bad_steps: int = 0  # steps skipped for non-finite loss or gradients
    consecutive_bad: int = 0
    skipped_samples: int = 0  # bad samples dropped by data.on_error=skip
    skipped_updates: int = 0  # gradient-norm spikes skipped (train.skip_threshold)
    consecutive_skips: int = 0
    forced_updates: int = 0  # applied after max_consecutive_skips skips in a row
    ema_updates: int = 0
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
    # Where the epoch's data stands (data/order.py's plan record; mid-epoch checkpoints).
    data_plan: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})
