"""A split's shard layout as a checkpoint records it, and what a changed layout means for a
position inside an epoch.

A checkpoint keeps the layout (each shard's name, sample count and sha256) beside the epoch's
position, which is a count into an order built from that layout. On resume a shard is known
by its content (sha256 and count; name and count where the index has no hash), so shards that
were moved, renamed or reordered keep their samples' identity. The rest of an interrupted
epoch is then re-planned exactly: the samples not yet trained, in shards still present, plus
every sample of shards added since; shards removed since take their untrained samples with
them. A shard whose content changed after some of its samples were trained cannot be mapped
(which of its new samples were trained?): that is refused, naming the shards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vae_scale.errors import ConfigError

Layout = list[list]  # [[name, num_samples, sha256 or None], ...] in index order


def layout_of(entries: Sequence) -> Layout:
    """The layout of ShardEntry-like objects (name, num_samples, sha256)."""
    return [[e.name, int(e.num_samples), e.sha256] for e in entries]


def _identity(shard: list) -> tuple:
    name, count, sha = shard
    return ("sha256", sha, count) if sha else ("name", name, count)


@dataclass
class LayoutChange:
    """How the shards of a checkpoint's layout (old) map onto the current one (new)."""

    old: Layout
    new: Layout

    def __post_init__(self) -> None:
        free: dict[tuple, list[int]] = {}
        for j, shard in enumerate(self.new):
            free.setdefault(_identity(shard), []).append(j)
        # old shard number -> new shard number (None: gone or changed)
        self.mapping: list[int | None] = [
            free[_identity(s)].pop(0) if free.get(_identity(s)) else None for s in self.old
        ]
        mapped = {j for j in self.mapping if j is not None}
        self.added = [j for j in range(len(self.new)) if j not in mapped]
        self.gone = [i for i, j in enumerate(self.mapping) if j is None]

    @property
    def changed(self) -> bool:
        return self.old != self.new

    def describe(self) -> str:
        names_new = {s[0] for s in self.new}
        replaced = [self.old[i][0] for i in self.gone if self.old[i][0] in names_new]
        removed = [self.old[i][0] for i in self.gone if self.old[i][0] not in names_new]
        added = [self.new[j][0] for j in self.added if self.new[j][0] not in replaced]
        moved = sum(
            1
            for i, j in enumerate(self.mapping)
            if j is not None and self.new[j][0] != self.old[i][0]
        )
        parts = [
            f"{len(self.old)} shards of {sum(s[1] for s in self.old)} samples -> "
            f"{len(self.new)} of {sum(s[1] for s in self.new)}"
        ]
        for what, names in (("content changed", replaced), ("removed", removed), ("added", added)):
            if names:
                parts.append(f"{what}: {_some(names)}")
        if moved:
            parts.append(f"{moved} renamed")
        return "; ".join(parts)

    def remaining(
        self, old_remaining: np.ndarray, old_consumed: np.ndarray, new_order: np.ndarray
    ) -> np.ndarray:
        """The current layout's global ids of what the interrupted epoch has left: the old
        plan's untrained samples (`old_remaining`, old ids, kept in their order) in shards
        still present, then every sample of added shards (in `new_order`'s order). Raises
        ConfigError when a shard with trained samples is no longer there as it was."""
        old_off = _offsets(self.old)
        new_off = _offsets(self.new)
        trained_in = np.unique(np.searchsorted(old_off, old_consumed, side="right") - 1)
        lost = [self.old[i][0] for i in trained_in.tolist() if self.mapping[i] is None]
        if lost:
            raise ConfigError(
                f"the shards changed since the checkpoint ({self.describe()}), and "
                f"{_some(lost)} held samples this epoch had already trained: which of the new "
                f"samples those were is unknown"
            )
        shard = np.searchsorted(old_off, old_remaining, side="right") - 1
        target = np.array([-1 if j is None else j for j in self.mapping], dtype=np.int64)
        new_shard = target[shard] if len(shard) else np.zeros(0, np.int64)
        kept = new_shard >= 0
        carried = new_off[new_shard[kept]] + (old_remaining[kept] - old_off[shard[kept]])
        new_shard_of = np.searchsorted(new_off, new_order, side="right") - 1
        fresh = new_order[np.isin(new_shard_of, self.added)]
        return np.concatenate([carried, fresh]).astype(np.int64)


def _offsets(layout: Layout) -> np.ndarray:
    return np.concatenate([[0], np.cumsum([s[1] for s in layout])]).astype(np.int64)


def _some(names: list[str]) -> str:
    shown = ", ".join(names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")
