"""Where training stands in an epoch, and what it reads next: the epoch plans of one split
(data/streaming/order.py), the position a mid-epoch checkpoint keeps (the training split's
checkpointed state, `train_data`), and the re-plan when the topology or the shards changed
since that checkpoint (data/streaming/layout.py)."""

from __future__ import annotations

from typing import Any

import numpy as np

from vae_scale.data.streaming.catalog import SplitCatalog
from vae_scale.data.streaming.layout import LayoutChange, layout_of
from vae_scale.data.streaming.order import (
    EpochPlan,
    Topology,
    batches_for,
    global_order,
    plan_record,
    unpack_ids,
)
from vae_scale.errors import ConfigError


class EpochPlanner:
    """The epoch plans of `catalog`'s split for `topology`; `shuffle`: shard order and sample
    shuffle (training)."""

    def __init__(self, catalog: SplitCatalog, topology: Topology, seed: int, shuffle: bool):
        self.catalog, self.topology, self.seed, self.shuffle = catalog, topology, seed, shuffle
        data = catalog.data
        self.drop_last = data.drop_last
        self.shuffle_block = data.shuffle_buffer if shuffle else 1
        # The plan record of the epoch being trained as of the last mid-epoch checkpoint (None
        # between epochs); a resumed run continues from it.
        self.position: dict[str, Any] | None = None
        # Resuming: how the shards differ from the checkpoint's (None: the same), the rest of
        # its interrupted epoch in the current shards' ids, and whether to start that epoch
        # over when the change makes its position meaningless (--restart-epoch).
        self.layout_change: LayoutChange | None = None
        self._remapped: np.ndarray | None = None
        self.restart_epoch = False

    def batches_in_epoch(self, multiple: int = 1) -> int:
        """Batches every rank runs in a full epoch (identical on all ranks): whole multiples
        of `multiple` (the batches of one optimizer step)."""
        return batches_for(self.catalog.num_samples, self.topology, self.drop_last, multiple)

    def plan(
        self, epoch: int, multiple: int = 1, record: dict[str, Any] | None = None
    ) -> tuple[EpochPlan, int]:
        """The epoch's plan and the rank batches of it already trained. `record`: a
        checkpoint's plan record of this epoch (same topology: continue it; another: re-plan
        the samples it had not trained yet)."""
        order = self._order(epoch)
        if record is None:
            return self._new_plan(order, epoch, 0, multiple), 0
        if self._remapped is not None:  # the shards changed: what was left, in their ids
            remaining, self._remapped = self._remapped, None
            return self._new_plan(remaining, epoch, record["generation"] + 1, multiple), 0
        old = self._recorded_plan(record, order, self.catalog.num_samples)
        if old.topo == self.topology:
            return old, record["rank_batches"]
        remaining = old.remaining_after(record["rank_batches"])
        return self._new_plan(remaining, epoch, old.generation + 1, multiple), 0

    def record(self, plan: EpochPlan, rank_batches: int) -> dict[str, Any]:
        """The plan record a mid-epoch checkpoint keeps."""
        total = self.catalog.num_samples
        out = plan_record(plan, rank_batches, total, full=plan.generation == 0)
        out["shuffle_block"] = plan.shuffle_block
        return out

    def _order(self, epoch: int) -> np.ndarray:
        if not self.catalog.indexed:  # resampled: the plan only counts batches
            return np.arange(self.catalog.num_samples, dtype=np.int64)
        return global_order(self.catalog.counts, self.seed, epoch, self.shuffle)

    def _new_plan(self, samples: np.ndarray, epoch: int, generation: int, multiple: int):
        batches = batches_for(len(samples), self.topology, self.drop_last, multiple)
        return EpochPlan(
            samples, self.topology, batches, self.seed, epoch, generation, self.shuffle_block
        )

    def _recorded_plan(self, record: dict[str, Any], order: np.ndarray, total: int) -> EpochPlan:
        """The plan a checkpoint's `record` describes, over the epoch's `order` of `total`."""
        samples = order
        if record.get("plan_samples") is not None:
            mask = np.zeros(total, dtype=bool)
            mask[unpack_ids(record["plan_samples"], total)] = True
            samples = order[mask[order]]
        batches = record["batches"] if "batches" in record else record["steps"]  # older name
        block = record.get("shuffle_block", self.shuffle_block)
        topology = Topology(*record["topology"])
        return EpochPlan(
            samples, topology, batches, self.seed, record["epoch"], record["generation"], block
        )

    # ------------------------------------------------------------------ checkpointed state

    def state_dict(self) -> dict[str, Any]:
        layout = layout_of(self.catalog.shards) if self.catalog.indexed else None
        return {"plan": self.position, "layout": layout}

    def load_state_dict(self, values: dict[str, Any]) -> None:
        """A checkpoint's position; when the shards changed since (data/streaming/layout.py),
        the rest of its epoch is mapped onto the current ones now, so that a change it cannot
        map is refused before anything starts."""
        self.position = values.get("plan")
        saved = values.get("layout")
        if saved is None or not self.catalog.indexed:
            return
        change = LayoutChange(saved, layout_of(self.catalog.shards))
        if not change.changed:
            return
        self.layout_change = change
        if self.position is None:
            return
        record = self.position
        try:
            self._remapped = self._remap(change, record)
        except ConfigError as err:
            if not self.restart_epoch:
                raise ConfigError(
                    f"{err}. Resume with the shards it was trained on (data.shards_dir / "
                    f"data.urls), or add --restart-epoch to train epoch {record['epoch']} from "
                    f"its start on these shards (the {record['samples_consumed']} samples it "
                    f"had trained are then trained again)"
                ) from None
            self.position = None

    def _remap(self, change: LayoutChange, record: dict[str, Any]) -> np.ndarray:
        """The current shards' ids of what `record`'s plan (over the old layout) had left."""
        counts = [s[1] for s in change.old]
        order = global_order(counts, self.seed, record["epoch"], self.shuffle)
        old = self._recorded_plan(record, order, sum(counts))
        done = record["rank_batches"]
        return change.remaining(
            old.remaining_after(done), old.consumed(done), self._order(record["epoch"])
        )
