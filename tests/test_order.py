"""The epoch plan (data/order.py): what every rank and worker reads, what an epoch leaves out,
and elastic re-plans, at cluster sizes no test machine has (pure functions of numbers)."""

import numpy as np
import pytest

from vae_scale.data.streaming.order import (
    EpochPlan,
    Topology,
    batches_for,
    global_order,
    pack_ids,
    unpack_ids,
)

CIFAR_SHARDS = [500] * 90  # full CIFAR-10 train split as `vae-scale shard cifar10` writes it


def make_plan(counts, world, workers, batch, drop_last=True, block=2000, epoch=1, samples=None):
    topo = Topology(world, workers, batch)
    order = global_order(counts, seed=0, epoch=epoch, shuffle=True) if samples is None else samples
    return EpochPlan(order, topo, batches_for(len(order), topo, drop_last), 0, epoch, 0, block)


def rank_ids(plan: EpochPlan, rank: int) -> np.ndarray:
    return np.concatenate([plan.worker_stream(rank, w) for w in range(plan.topo.workers)])


@pytest.mark.parametrize("world, workers", [(8, 4), (16, 4), (64, 8)])
def test_cifar_epoch_leaves_out_less_than_one_global_batch(world, workers):
    plan = make_plan(CIFAR_SHARDS, world, workers, batch=128)
    total = sum(CIFAR_SHARDS)
    per_rank = [rank_ids(plan, r) for r in range(world)]
    assert all(len(ids) == plan.batches * 128 for ids in per_rank)  # same steps on every rank
    seen = np.concatenate(per_rank)
    assert len(np.unique(seen)) == len(seen)  # ranks and workers disjoint
    assert plan.dropped == total - len(seen) <= world * 128 - 1
    assert plan.dropped == total % (world * 128)
    for w in range(workers):  # workers of a rank differ by at most one batch
        assert abs(plan.worker_batches(w) - plan.worker_batches(0)) <= 1


def test_without_drop_last_the_tail_wraps_and_is_counted():
    plan = make_plan(CIFAR_SHARDS, 16, 4, 128, drop_last=False)
    seen = np.concatenate([rank_ids(plan, r) for r in range(16)])
    assert plan.dropped == 0 and plan.padded == plan.batches * 16 * 128 - 45_000 > 0
    assert set(seen.tolist()) == set(range(45_000))  # every sample, the padding repeats some
    assert len(seen) - len(np.unique(seen)) == plan.padded


def test_order_is_a_function_of_seed_and_epoch_only():
    one = make_plan([7, 13, 5, 20], 1, 1, 4)
    again = make_plan([7, 13, 5, 20], 1, 1, 4)
    other = make_plan([7, 13, 5, 20], 1, 1, 4, epoch=2)
    assert np.array_equal(one.samples, again.samples)
    assert not np.array_equal(one.samples, other.samples)
    # the same global order however many ranks and workers read it
    assert np.array_equal(make_plan([7, 13, 5, 20], 3, 2, 2).samples, one.samples)


def test_a_shards_samples_stay_contiguous_in_the_order():
    order = global_order([3, 4, 2], seed=5, epoch=1, shuffle=True).tolist()
    assert sorted(order) == list(range(9))
    for first, last in [(0, 2), (3, 6), (7, 8)]:  # each shard: its members in a row, in order
        at = order.index(first)
        assert order[at : at + last - first + 1] == list(range(first, last + 1))


@pytest.mark.parametrize("new", [(1, 1, 50), (3, 1, 25), (1, 2, 16), (4, 3, 10)])
def test_elastic_replan_trains_each_remaining_sample_exactly_once(new):
    """A plan interrupted after k batches on 2 ranks x 1 worker, re-planned on another
    topology: the union of what both plans train holds no sample twice, and what the second
    leaves out is less than one of its global batches."""
    counts = [128] * 13 + [101]  # Frey's 1,765 training faces
    first = make_plan(counts, 2, 1, 25, block=100)
    k = 11
    done = first.consumed(k)
    rest = first.remaining_after(k)
    assert len(done) == 2 * k * 25 and len(rest) == 1765 - len(done)
    world, workers, batch = new
    second = make_plan(counts, world, workers, batch, block=100, samples=rest)
    later = np.concatenate([rank_ids(second, r) for r in range(world)])
    union = np.concatenate([done, later])
    assert len(np.unique(union)) == len(union)
    assert 1765 - len(union) == second.dropped <= world * batch - 1


def test_same_topology_resume_continues_the_stream_exactly():
    plan = make_plan([128] * 14, 2, 2, 10, block=64)
    k = 7  # rank batches done
    for rank in range(2):
        for w in range(2):
            stream = plan.worker_stream(rank, w)
            before = plan.worker_batches_before(w, k) * 10
            assert before == (4 if w == 0 else 3) * 10  # batches 0,2,4,6 / 1,3,5
            assert len(stream) == plan.worker_batches(w) * 10
    assert len(plan.consumed(k)) == 2 * k * 10


def test_packed_ids_round_trip():
    ids = np.array([0, 5, 6, 44_999])
    assert np.array_equal(unpack_ids(pack_ids(ids, 45_000), 45_000), ids)
    assert len(pack_ids(np.arange(40_000), 45_000)) < 200  # a prefix compresses to almost nothing


def test_a_changed_layout_maps_what_an_epoch_has_left_by_shard_content():
    from vae_scale.data.streaming.layout import LayoutChange
    from vae_scale.errors import ConfigError

    old = [["a.tar", 4, "h-a"], ["b.tar", 3, "h-b"], ["c.tar", 5, "h-c"]]
    # a renamed and moved to the end, b removed, d added, c unchanged
    new = [["c.tar", 5, "h-c"], ["d.tar", 2, "h-d"], ["x.tar", 4, "h-a"]]
    change = LayoutChange(old, new)
    assert change.describe() == (
        "3 shards of 12 samples -> 3 of 11; removed: b.tar; added: d.tar; 1 renamed"
    )
    order = np.arange(12)
    consumed = np.array([0, 1, 7, 8])  # two of a, two of c; none of b
    remaining = np.setdiff1d(order, consumed)
    ids = change.remaining(remaining, consumed, np.arange(11))
    # a's last two (x.tar: new ids 9, 10), c's last three (new 2..4), then all of d (5, 6)
    assert ids.tolist() == [9, 10, 2, 3, 4, 5, 6]
    with pytest.raises(ConfigError, match="b.tar held samples this epoch had already trained"):
        change.remaining(np.array([6]), np.array([4]), np.arange(11))
