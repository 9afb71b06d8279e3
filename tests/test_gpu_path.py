"""The GPU path's design, checked on the CPU: with a fused AdamW the update policy decides on
the device, so a steady-state step reads nothing on the host (no synchronisation), and it
skips exactly what the host policy skips; batches reach the device as the step wants them."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from vae_scale.config import config_from_dict
from vae_scale.data.streaming.inputs import DeviceBatches
from vae_scale.metrics import MetricSums
from vae_scale.training.setup import build_training, make_accelerator
from vae_scale.training.state import TrainState
from vae_scale.training.step import train_step
from vae_scale.utils.compat import reset_accelerate_state

HOST_READS = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy"}
SHAPE = (1, 12, 8)


class HostReads(TorchFunctionMode):
    """Records every call that copies a tensor value to the host (on a GPU: a sync)."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def tiny_setup(*overrides: str):
    raw = {
        "model": {"name": "conv", "latent_dim": 4, "base_channels": 4, "num_layers": 2},
        "data": {"batch_size": 6},
        "loss": {"likelihood": "gaussian"},
        "train": {"ema_decay": 0.9, "skip_threshold": 50.0, "max_consecutive_skips": 2},
        "wandb": {"mode": "disabled"},
    }
    cfg = config_from_dict(raw, list(overrides))
    reset_accelerate_state()
    accelerator = make_accelerator(cfg, "disabled")
    torch.manual_seed(0)
    objective, nets = build_training(cfg, accelerator, SHAPE)
    return cfg, accelerator, (objective, nets)


def batches(n: int, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"image": torch.randint(0, 256, (6, *SHAPE), generator=g, dtype=torch.uint8), "skipped": 0}
        for _ in range(n)
    ]


def loop_steps(cfg, accelerator, training, state, stream, sums, total_steps: int = 100) -> None:
    """What the training loop does per batch between log steps (`training`: the objective and
    its networks)."""
    objective, nets = training
    on_device = DeviceBatches(
        stream, accelerator.device, cfg.train.channels_last, cfg.data.binarize
    )
    for _batch, x in on_device:
        out = train_step(accelerator, objective, nets, x, state, total_steps)
        sums.add_terms(out.terms, x.shape[0])


@pytest.mark.parametrize("fused", [True, False])
def test_steady_state_steps_read_nothing_on_the_host_with_fused_adamw(fused):
    cfg, accelerator, training = tiny_setup(
        f"train.fused_adamw={str(fused).lower()}", "train.skip_threshold=1e5"
    )
    vae = training[1]["vae"]
    assert vae.policy.on_device is fused
    state = TrainState()
    sums = MetricSums.lazy(accelerator.device)
    loop_steps(cfg, accelerator, training, state, batches(3), sums)  # warm-up (first EMA copy)
    with HostReads() as reads:
        loop_steps(cfg, accelerator, training, state, batches(5, seed=2), sums)
    if fused:
        assert reads.calls == []
    else:  # the host policy reads the gradient norm every step: the detector sees it
        assert reads.calls.count("__float__") >= 5
    vae.policy.settle()
    assert state.opt_step == 8 and vae.ema.updates == 8
    reset_accelerate_state()


def test_device_policy_skips_what_the_host_policy_skips(monkeypatch):
    """The same fused AdamW, batches, NaN steps and gradient spikes: weights, EMA and counters
    end equal whether the policy decides on the host or on the device."""
    results = {}
    for on_device in (False, True):
        cfg, accelerator, training = tiny_setup(
            "train.fused_adamw=true", "train.max_bad_steps=5", "train.skip_threshold=5e3"
        )
        vae = training[1]["vae"]
        vae.policy.on_device = on_device
        vae.policy.load_state_dict({})  # counters where this path keeps them
        state = TrainState()
        sums = MetricSums.lazy(accelerator.device)
        original = type(vae.unwrapped).decode
        for k, batch in enumerate(batches(12)):
            scale = float("nan") if k in (3, 4) else (100.0 if k in (7, 8, 9) else 1.0)
            monkeypatch.setattr(
                type(vae.unwrapped),
                "decode",
                lambda self, z, s=scale, decode=original: decode(self, z) * s,
            )
            loop_steps(cfg, accelerator, training, state, [batch], sums)
        monkeypatch.setattr(type(vae.unwrapped), "decode", original)
        vae.policy.settle()
        counts = vae.policy.counts
        counters = (counts.bad_steps, counts.skipped_updates, counts.forced_updates, state.opt_step)
        weights = {k: v.clone() for k, v in vae.unwrapped.state_dict().items()}
        ema = {k: v.clone() for k, v in vae.ema.module.state_dict().items()}
        results[on_device] = counters, weights, ema
        reset_accelerate_state()
    (host_counts, host_w, host_ema), (dev_counts, dev_w, dev_ema) = results[False], results[True]
    assert host_counts == dev_counts and host_counts[:3] == (2, 2, 1)  # 2 NaN, 2 skipped + 1 forced
    assert all(torch.equal(host_w[k], dev_w[k]) for k in host_w)
    assert all(torch.equal(host_ema[k], dev_ema[k]) for k in host_ema)


def test_divergence_on_the_device_path_is_caught_at_the_next_settle(monkeypatch):
    from vae_scale.training.networks import TrainingDiverged

    cfg, accelerator, training = tiny_setup(
        "train.fused_adamw=true", "train.max_bad_steps=3", "train.skip_threshold=0"
    )
    vae = training[1]["vae"]
    state = TrainState()
    sums = MetricSums.lazy(accelerator.device)
    original = type(vae.unwrapped).decode
    monkeypatch.setattr(type(vae.unwrapped), "decode", lambda self, z: original(self, z) * 0 / 0)
    loop_steps(cfg, accelerator, training, state, batches(4), sums)
    monkeypatch.setattr(type(vae.unwrapped), "decode", original)
    loop_steps(cfg, accelerator, training, state, batches(1), sums)  # a good step ends the run
    counts = vae.policy.counts
    assert counts.bad_steps == counts.consecutive_bad == 0  # not settled yet
    vae.policy.settle()
    counts = vae.policy.counts
    assert counts.bad_steps == 4 and counts.consecutive_bad == 0
    with pytest.raises(TrainingDiverged, match="4 optimizer steps in a row"):
        vae.policy.check_divergence(None)  # the run of 4 was seen on the device
    assert all(torch.isfinite(p).all() for p in vae.unwrapped.parameters())  # never applied
    reset_accelerate_state()


def test_device_batches_are_float_pixels_in_the_step_layout():
    stream = batches(3)
    got = list(DeviceBatches(stream, torch.device("cpu"), channels_last=True))
    assert [b is s for (b, _), s in zip(got, stream)] == [True] * 3
    for (_batch, x), s in zip(got, stream):
        assert x.dtype == torch.float32 and torch.equal(x, s["image"].float() / 255)
        assert x.is_contiguous(memory_format=torch.channels_last)
