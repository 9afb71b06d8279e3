"""GPU tests (`pytest -m gpu`; skipped without CUDA): mixed precision agrees with fp32 for
every config, the compiled model equals the eager one, a steady-state step makes no host
synchronisation, prefetched batches equal direct ones, and a short run's loss falls.
`benchmarks/device_check.sh` runs them on the GPU machine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_gpu_path import loop_steps

from conftest import REPO
from vae_scale.config import load_config
from vae_scale.data.streaming.inputs import DeviceBatches, images_to_float
from vae_scale.losses import build_likelihood, neg_elbo
from vae_scale.metrics import MetricSums
from vae_scale.models import build_model
from vae_scale.training.setup import build_training, make_accelerator
from vae_scale.training.state import TrainState
from vae_scale.utils.compat import reset_accelerate_state

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SHAPES = {"frey": (1, 28, 20), "mnist": (1, 28, 28), "cifar10": (3, 32, 32), "celeba": (3, 64, 64)}
CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
# Relative difference of the batch's mean negative ELBO to fp32's (losses are computed in fp32
# from half-precision activations): bf16 keeps 8 mantissa bits, fp16 11.
TOLERANCE = {"bf16": 3e-2, "fp16": 1e-2}


def config(name: str, *overrides: str):
    return load_config(REPO / "configs" / f"{name}.yaml", ["wandb.mode=disabled", *overrides])


def batch_of(shape, n=16, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)


def mean_loss(model, x, eps, precision: str) -> float:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype or torch.float32, enabled=bool(dtype)):
        out = model(x, eps)
        terms = neg_elbo(
            model.likelihood, out.x_params, x, out.mu, out.logvar, kl_groups=out.kl_groups
        )
    return terms.neg_elbo.float().mean().item()


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_loss_agrees_with_fp32(name, precision):
    cfg = config(name)
    shape = SHAPES[cfg.data.dataset]
    torch.manual_seed(0)
    model = build_model(cfg.model, shape, build_likelihood(cfg.loss.likelihood, shape)).cuda()
    model.eval()
    x = images_to_float(batch_of(shape), "cuda")
    eps = torch.randn((x.shape[0], *model.latent_shape), device="cuda")
    reference = mean_loss(model, x, eps, "fp32")
    got = mean_loss(model, x, eps, precision)
    assert abs(got - reference) <= TOLERANCE[precision] * abs(reference), (got, reference)


@pytest.mark.parametrize("name", ["cifar10_resnet", "frey_conv"])
def test_compiled_model_equals_eager(name):
    cfg = config(name)
    shape = SHAPES[cfg.data.dataset]
    torch.manual_seed(0)
    model = build_model(cfg.model, shape, build_likelihood(cfg.loss.likelihood, shape)).cuda()
    x = images_to_float(batch_of(shape), "cuda")
    eps = torch.randn((x.shape[0], *model.latent_shape), device="cuda")
    eager = mean_loss(model, x, eps, "fp32")
    compiled = torch.compile(model)
    assert mean_loss(compiled, x, eps, "fp32") == pytest.approx(eager, rel=1e-4)


@pytest.mark.parametrize("name", ["cifar10_resnet", "celeba64_resnet"])
def test_steady_state_steps_make_no_host_sync(name):
    """Fused AdamW, the device-side update policy, EMA, bf16, channels_last, the prefetching
    input path and the epoch sums: torch raises on any synchronising call."""
    cfg = config(name, "data.batch_size=32", "train.ema_decay=0.999", "train.skip_threshold=1e6")
    shape = SHAPES[cfg.data.dataset]
    reset_accelerate_state()
    accelerator = make_accelerator(cfg, "disabled")
    training = build_training(cfg, accelerator, shape)
    vae = training[1]["vae"]
    assert vae.policy.on_device
    state = TrainState()
    sums = MetricSums.lazy(accelerator.device)

    def steps(n: int, seed: int) -> None:
        stream = [{"image": batch_of(shape, 32, seed + k).pin_memory()} for k in range(n)]
        loop_steps(cfg, accelerator, training, state, stream, sums, total_steps=1000)

    steps(3, 0)  # warm-up: allocations, the EMA's first copy, cuDNN autotuning
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        steps(5, 100)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    vae.policy.settle()
    assert state.opt_step == 8 and vae.policy.counts.bad_steps == 0
    accelerator.end_training()
    reset_accelerate_state()


def test_prefetched_batches_equal_direct_conversion():
    stream = [{"image": batch_of((3, 32, 32), 64, k).pin_memory()} for k in range(5)]
    got = list(DeviceBatches(stream, torch.device("cuda"), channels_last=True))
    for (batch, x), direct in zip(got, stream):
        assert batch is direct and x.is_cuda
        assert torch.equal(x, direct["image"].cuda().float() / 255)


@pytest.fixture(scope="module")
def gpu_cifar_shards(tmp_path_factory) -> Path:
    from vae_scale.data.sourcing.base import SourceData
    from vae_scale.data.sourcing.shards import write_dataset

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)  # 8 prototypes + noise

    def samples(n, offset):
        out = []
        for i in range(n):
            noise = rng.integers(-20, 21, (32, 32, 3))
            image = np.clip(base[i % 8].astype(int) + noise, 0, 255).astype(np.uint8)
            out.append({"__key__": f"s{offset + i:05d}", "npy": image, "cls": i % 8})
        return out

    data = SourceData(
        "cifar10", (3, 32, 32), {"train": samples(2048, 0), "test": samples(256, 10**4)}, {}
    )
    root = tmp_path_factory.mktemp("gpu_shards")
    write_dataset(data, root / "cifar10", shard_size=256)
    return root


def test_short_gpu_run_loss_falls(gpu_cifar_shards, tmp_path):
    from vae_scale.run_files.logs import read_rows
    from vae_scale.training.loop import train

    cfg = config(
        "cifar10_resnet",
        f"data.shards_dir={gpu_cifar_shards}",
        f"run.dir={tmp_path}",
        "train.epochs=3",
        "data.num_workers=2",
        "eval.picture_epochs=[]",
    )
    rows = read_rows(train(cfg))
    losses = [r["test/neg_elbo"] for r in rows]
    assert len(losses) == 3 and losses[-1] < losses[0]
