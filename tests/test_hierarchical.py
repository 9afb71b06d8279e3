"""The hierarchical (top-down ladder) VAE, and the loop's stability switches it relies on:
gradient-spike skipping, EMA weights, per-group KL logging."""

import json
from pathlib import Path

import pytest
import torch
from test_cifar10 import make_cifar_folder

from conftest import REPO, tiny_config
from vae_scale.config import load_config
from vae_scale.data.sourcing import cifar10
from vae_scale.data.sourcing.shards import write_dataset
from vae_scale.errors import ConfigError
from vae_scale.losses import build_likelihood, neg_elbo
from vae_scale.models import build_model
from vae_scale.models.hierarchical import HierarchicalVAE, HierarchicalVAEConfig
from vae_scale.training import checkpoint
from vae_scale.training.loop import train


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is faster than two on a loaded 2-core machine
    (OpenMP's barrier waits dominated: 10x slower measured with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


RES = {8: [1, 4, 8], 32: [1, 4, 8, 16, 32], 64: [1, 4, 8, 16, 32, 64]}


def tiny(size: int = 32, groups: list[int] | None = None, **kw) -> HierarchicalVAEConfig:
    stages = len(RES[size])
    cfg = HierarchicalVAEConfig(
        resolutions=RES[size],
        widths=[8] * stages,
        latent_groups=groups or [1, 2, 1] + [0] * (stages - 3),
        encoder_blocks=[1] * stages,
        latent_channels=2,
        **kw,
    )
    return cfg


def tiny_model(size: int = 32, likelihood: str = "logistic_mixture", **kw) -> HierarchicalVAE:
    torch.manual_seed(0)
    shape = (3, size, size)
    return build_model(tiny(size, **kw), shape, build_likelihood(likelihood, shape))


def switch_on(model: torch.nn.Module) -> None:
    """Random weights everywhere (the init zeroes the priors' last layers)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)


# ---------------------------------------------------------------------------- model


@pytest.mark.parametrize("size", [32, 64])
def test_shapes_and_groups(size):
    model = tiny_model(size)
    x = torch.rand(2, 3, size, size)
    out = model(x)
    assert out.x_params.shape == (2, 45, size, size)  # 5-component mixture, 3 channels
    assert model.latent_group_names == ["group0_1x1", "group1_4x4", "group2_4x4", "group3_8x8"]
    dims = 2 * (1 + 16 + 16 + 64)
    assert model.latent_shape == (dims,)
    assert out.z.shape == out.mu.shape == out.logvar.shape == (2, dims)
    assert [kl.shape for kl in out.kl_groups.values()] == [
        (2, 2, 1, 1),
        (2, 2, 4, 4),
        (2, 2, 4, 4),
        (2, 2, 8, 8),
    ]
    assert model.sample(3).shape == (3, 3, size, size)
    assert model.reconstruct(x).shape == (2, 3, size, size)
    # decode(encode(x) means) is the posterior-mean pass: the whitened latent round-trips
    switch_on(model)
    mean_pass = model.top_down(2, model.bottom_up(x), [None] * 4, "mean")[0]
    torch.testing.assert_close(model.decode(model.encode(x)[0]), mean_pass, atol=1e-5, rtol=1e-4)


def test_config_errors_name_the_key():
    cifar = REPO / "configs" / "cifar10_hvae.yaml"
    with pytest.raises(ConfigError, match=r"model.widths: expected one entry per stage"):
        load_config(cifar, ["model.widths=[8,8]"])
    with pytest.raises(ConfigError, match=r"model.resolutions\[2\]: expected increasing"):
        load_config(cifar, ["model.resolutions=[1,4,6,16,32]"])
    with pytest.raises(ConfigError, match=r"model.latent_groups\[0\]: expected at least one"):
        load_config(cifar, ["model.latent_groups=[0,0,0,0,0]"])
    with pytest.raises(ConfigError, match="train.ema_decay"):
        load_config(cifar, ["train.ema_decay=1.0"])
    with pytest.raises(ConfigError, match="model.resolutions: the last stage"):
        build_model(tiny(32), (3, 64, 64), build_likelihood("logistic", (3, 64, 64)))


def test_group_kls_sum_to_the_total_kl():
    model = tiny_model(8)
    switch_on(model)
    x = torch.rand(4, 3, 8, 8)
    out = model(x)
    terms = neg_elbo(model.likelihood, out.x_params, x, out.mu, out.logvar, 1.0, 0, out.kl_groups)
    total = sum(terms.kl_groups.values())
    torch.testing.assert_close(total, terms.kl, rtol=1e-5, atol=1e-4)
    assert all((kl > 0).all() for kl in terms.kl_groups.values())
    torch.testing.assert_close(terms.neg_elbo, terms.recon + terms.kl)


def test_one_group_is_the_single_latent_vae():
    """Only the top group on: its prior is N(0, I), so the loss is the ResNet VAE's formula
    (recon + KL(N(mu, exp(logvar)) || N(0, I))) on the same tensors, to the last bit."""
    model = tiny_model(8, groups=[1, 0, 0])
    switch_on(model)
    x = torch.rand(3, 3, 8, 8)
    out = model(x)
    ladder = neg_elbo(model.likelihood, out.x_params, x, out.mu, out.logvar, 0.7, 0, out.kl_groups)
    single = neg_elbo(model.likelihood, out.x_params, x, out.mu, out.logvar, 0.7)
    assert torch.equal(ladder.loss, single.loss) and torch.equal(ladder.kl, single.kl)
    # ... and z = mu + sigma * eps with the given noise, as in the base VAE
    eps = torch.randn(3, *model.latent_shape)
    out = model(x, eps)
    torch.testing.assert_close(out.z, out.mu + torch.exp(0.5 * out.logvar) * eps)


def test_temperature_scales_every_groups_prior_std_and_sampling_is_seeded():
    model = tiny_model(8)
    switch_on(model)
    eps = torch.randn(2, *model.latent_shape)
    for t in (0.0, 0.6, 1.0):
        _, stats = model.top_down(
            2, None, [e.float() for e in model.split_groups(t * eps)], "prior"
        )
        for st, e in zip(stats, model.split_groups(eps), strict=True):
            # prior pass: st.mu, st.logvar are the prior's; z = mu_p + t * sigma_p * eps
            torch.testing.assert_close(st.z - st.mu, t * torch.exp(0.5 * st.logvar) * e)
    assert any(st.logvar.abs().max() > 0.01 for st in stats[1:])  # learned priors, not N(0, I)

    def draw(seed: int, t) -> torch.Tensor:
        return model.sample(4, torch.Generator().manual_seed(seed), temperature=t)

    assert torch.equal(draw(0, 1.0), draw(0, 1.0))  # deterministic given the seed
    assert not torch.equal(draw(0, 1.0), draw(0, 0.0))
    assert torch.equal(draw(0, 0.0), draw(1, 0.0))  # t = 0: every group at its prior mean
    per_group = draw(0, [1.0, 1.0, 1.0, 0.0])
    assert not torch.equal(per_group, draw(0, 1.0))
    with pytest.raises(ConfigError, match="one per latent group"):
        draw(0, [1.0, 0.5])


def test_log_weights_are_the_elbo_integrand_and_checkpointing_keeps_gradients():
    model = tiny_model(8, likelihood="logistic")
    switch_on(model)
    n, x = 200, torch.rand(2, 3, 8, 8)
    eps = torch.randn(n, 2, *model.latent_shape)
    with torch.no_grad():
        log_w = model.log_weights(x, eps)  # (n, 2)
        out = model(x.repeat(n, 1, 1, 1), eps.flatten(0, 1))  # the same posterior draws
        terms = neg_elbo(
            model.likelihood,
            out.x_params,
            x.repeat(n, 1, 1, 1),
            out.mu,
            out.logvar,
            1,
            0,
            out.kl_groups,
        )
    # log w = log p(x|z) - (log q(z|x) - log p(z)): the same reconstruction term, and a
    # single-sample KL estimate whose mean is the analytic KL the loss uses
    sampled_kl = (-log_w.flatten() - terms.recon).view(n, 2)
    assert sampled_kl.mean(0).tolist() == pytest.approx(
        terms.kl.view(n, 2).mean(0).tolist(), rel=0.05
    )
    assert not torch.allclose(sampled_kl, terms.kl.view(n, 2))

    def grads(flag: bool) -> list[torch.Tensor]:
        for block in model.modules():
            if hasattr(block, "grad_checkpoint"):
                block.grad_checkpoint = flag
        model.zero_grad()
        out = model(x, torch.zeros(2, *model.latent_shape))
        terms = neg_elbo(model.likelihood, out.x_params, x, out.mu, out.logvar, 1, 0, out.kl_groups)
        terms.loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(grads(False), grads(True), strict=True):
        torch.testing.assert_close(a, b)


def test_bf16_autocast_keeps_latent_densities_in_float32():
    """Under bf16 autocast the convs run in bf16; prior/posterior statistics, KLs and the
    likelihood stay float32, so the loss is finite and within 1 % of fp32."""
    model = tiny_model(8, likelihood="logistic")
    switch_on(model)
    x, eps = torch.rand(4, 3, 8, 8), torch.randn(4, *model.latent_shape)

    def loss(bf16: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x, eps)
        terms = neg_elbo(model.likelihood, out.x_params, x, out.mu, out.logvar, 1, 0, out.kl_groups)
        assert all(kl.dtype == torch.float32 for kl in out.kl_groups.values())
        return terms.neg_elbo

    fp32, bf16 = loss(False), loss(True)
    assert torch.isfinite(bf16).all() and not torch.equal(fp32, bf16)
    torch.testing.assert_close(bf16, fp32, rtol=1e-2, atol=0)


# ---------------------------------------------------------------------------- the loop


@pytest.fixture(scope="module")
def hvae_shards(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("cifar_src")
    make_cifar_folder(source)
    out = tmp_path_factory.mktemp("shards")
    write_dataset(cifar10.prepare(source, seed=0, download_ok=False), out / "cifar10", 20)
    return out


# (train.skip_threshold=0: spike skipping is tested on its own below)
TINY_HVAE = (
    "data.batch_size=12 data.num_workers=0 data.shuffle_buffer=100 "
    "model.widths=[8,8,8,8,8] model.latent_groups=[1,2,1,0,0] "
    "model.encoder_blocks=[1,1,1,1,1] model.latent_channels=2 loss.likelihood=logistic "
    "loss.kl_warmup_steps=0 train.epochs=2 train.lr=3e-3 train.warmup_steps=0 "
    "train.weight_decay=0 train.mixed_precision=no train.ema_decay=0.5 "
    "train.grad_clip=0 train.skip_threshold=0 train.log_every_steps=3 eval.every_epochs=1 "
    "eval.picture_epochs=[] eval.recon_rows=4 eval.num_samples=4"
).split()


def tiny_hvae_config(shards: Path, run_dir: Path, *overrides: str):
    return tiny_config("cifar10_hvae", shards, run_dir, *TINY_HVAE, *overrides)


def rows(run: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def hvae_run(hvae_shards, tmp_path_factory) -> Path:
    return train(tiny_hvae_config(hvae_shards, tmp_path_factory.mktemp("runs")))


@pytest.mark.slow
def test_short_run_learns_and_logs_every_group(hvae_run):
    epochs = rows(hvae_run)
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert epochs[1]["train/neg_elbo"] < epochs[0]["train/neg_elbo"]
    assert epochs[1]["test/bpd"] < epochs[0]["test/bpd"]
    names = ["group0_1x1", "group1_4x4", "group2_4x4", "group3_8x8"]
    for r in epochs:
        for split in ("train", "val", "test"):
            per_group = [r[f"{split}/kl_{g}"] for g in names]
            assert sum(per_group) == pytest.approx(r[f"{split}/kl"], rel=1e-5)
        assert r["train/skipped_updates"] == 0
    step = rows(hvae_run, "steps.jsonl")[-1]
    assert {f"train/step_kl_{g}" for g in names} <= set(step) and step["train/grad_norm"] > 0
    assert (hvae_run / "samples_epoch002.png").is_file()


@pytest.mark.slow
def test_ema_is_checkpointed_and_is_what_eval_and_sampling_use(hvae_run):
    from accelerate import Accelerator
    from safetensors.torch import load_file

    from vae_scale.analysis.evaluate import EvalOptions, full_evaluation
    from vae_scale.analysis.runs import load_run
    from vae_scale.cli import main
    from vae_scale.config import DataConfig
    from vae_scale.data.streaming.loader import ShardSplit

    ckpt = checkpoint.latest_checkpoint(hvae_run / "checkpoints")
    raw, ema = load_file(ckpt / "model.safetensors"), load_file(ckpt / "ema.safetensors")
    assert raw.keys() == ema.keys()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)
    assert checkpoint.read_state(ckpt, "ema")["updates"] == 2 * (108 // 12)

    assert main(["eval", str(hvae_run), "--iw-samples", "16", "--batch-size", "25"]) == 0
    result = json.loads((hvae_run / "eval_test.json").read_text())
    elbo, iw = result["test/neg_elbo"], result["test/nll_iw16_nats"]
    assert iw <= elbo  # importance weighting over the hierarchical posterior tightens it
    assert result["test/bpd_iw16"] <= result["test/bpd"]
    last = rows(hvae_run)[-1]
    assert elbo == pytest.approx(last["test/neg_elbo"], rel=1e-5)  # training evaluated the EMA
    assert result["test/kl_group3_8x8"] == pytest.approx(last["test/kl_group3_8x8"], rel=1e-4)
    run = load_run(hvae_run, weights="raw")
    data = ShardSplit(Path(run.cfg.data.shards_dir) / "cifar10", "test", DataConfig(batch_size=25))
    accelerator = Accelerator(cpu=True)
    with_raw = full_evaluation(accelerator, run.model, data, EvalOptions())
    assert with_raw["test/neg_elbo"] != pytest.approx(elbo, rel=1e-4)

    for t in ("0", "1"):
        assert main(["sample", str(hvae_run), "--n", "4", "--temperature", t]) == 0
    from PIL import Image

    cold, warm = (Image.open(hvae_run / f"sample_t{t}_n4.png") for t in ("0", "1"))
    assert cold.tobytes() != warm.tobytes()


@pytest.mark.slow
def test_resume_with_ema_is_exact(hvae_shards, hvae_run, tmp_path):
    """One epoch, stop, resume for the second: the same EMA weights and metrics as the
    uninterrupted run (the EMA and its update count live in the checkpoint)."""
    from safetensors.torch import load_file

    cfg = tiny_hvae_config(hvae_shards, tmp_path, "train.epochs=1")
    train(cfg)
    run = train(tiny_hvae_config(hvae_shards, tmp_path))
    a = load_file(checkpoint.latest_checkpoint(run / "checkpoints") / "ema.safetensors")
    b = load_file(checkpoint.latest_checkpoint(hvae_run / "checkpoints") / "ema.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    got, want = rows(run)[-1], rows(hvae_run)[-1]
    assert got["test/neg_elbo"] == want["test/neg_elbo"]


def test_gradient_spikes_are_skipped_counted_and_never_forever(monkeypatch):
    """With a threshold below every gradient norm, VDVAE's rule would skip every update;
    here every (max_consecutive_skips + 1)-th update is applied, clipped to the threshold."""
    from accelerate import Accelerator

    from vae_scale.config import config_from_dict
    from vae_scale.training.networks import UpdatePolicy
    from vae_scale.training.state import TrainState
    from vae_scale.utils.compat import reset_accelerate_state

    cfg = config_from_dict(
        {
            "model": {"name": "mlp", "latent_dim": 2, "hidden": [4]},
            "train": {"skip_threshold": 1e-3, "max_consecutive_skips": 2, "lr": 0.1},
        }
    )
    accelerator = Accelerator(cpu=True)
    layer = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer, optimizer = accelerator.prepare(layer, optimizer)
    state = TrainState()
    policy = UpdatePolicy(cfg.train, on_device=False, device=torch.device("cpu"))

    def optimizer_step(accelerator, layer, optimizer, train_cfg, state, total):
        applied, norm = policy.step(accelerator, layer, optimizer, state.opt_step, total)
        state.opt_step += 1
        return applied, float(norm)

    pattern = []
    for _ in range(9):
        before = layer.weight.detach().clone()
        layer(torch.ones(1, 3)).sum().mul(100).backward()
        stepped, norm = optimizer_step(accelerator, layer, optimizer, cfg.train, state, 9)
        assert norm > 1e-3
        moved = (layer.weight.detach() - before).norm().item()
        assert stepped == (moved > 0)
        if stepped:  # SGD moved by lr * clipped gradient: the threshold bounds the step
            assert moved <= 0.1 * 1e-3 * 1.001
        pattern.append(stepped)
    assert pattern == [False, False, True] * 3
    # every call is an optimizer step, applied or skipped
    counts = policy.counts
    assert (counts.skipped_updates, counts.forced_updates, state.opt_step) == (6, 3, 9)
    # below the threshold nothing is skipped, and 0 consecutive skips means "never skip"
    cfg.train.skip_threshold, counts.consecutive_skips = 1e9, 0
    layer(torch.ones(1, 3)).sum().backward()
    assert optimizer_step(accelerator, layer, optimizer, cfg.train, state, 9)[0]
    cfg.train.skip_threshold, cfg.train.max_consecutive_skips = 1e-3, 0
    layer(torch.ones(1, 3)).sum().backward()
    assert optimizer_step(accelerator, layer, optimizer, cfg.train, state, 9)[0]
    assert counts.skipped_updates == 6
    reset_accelerate_state()


@pytest.mark.slow
def test_posterior_refinement_is_refused_for_latent_groups(hvae_shards, hvae_run, tmp_path):
    from vae_scale.analysis.evaluate import SampleNoise, refined_neg_elbo
    from vae_scale.cli import main

    with pytest.raises(ConfigError, match=r"eval\.refine_steps.*latent groups"):
        train(tiny_hvae_config(hvae_shards, tmp_path, "eval.refine_steps=5"))
    with pytest.raises(ConfigError, match=r"loss\.encoder_aug\.weight.*latent groups"):
        train(tiny_hvae_config(hvae_shards, tmp_path, "loss.encoder_aug.weight=1"))
    with pytest.raises(ConfigError, match=r"loss\.z_samples.*latent groups"):
        train(tiny_hvae_config(hvae_shards, tmp_path, "loss.z_samples=2"))
    # an error before any evaluation (another test writes eval_test.json: use the val split)
    assert main(["eval", str(hvae_run), "--split", "val", "--refine-steps", "5"]) == 2
    assert not (hvae_run / "eval_val.json").exists()
    model = tiny_model(8)
    with pytest.raises(ValueError, match="one Gaussian latent"):
        refined_neg_elbo(model, torch.rand(2, 3, 8, 8), None, SampleNoise(["a", "b"], 0, "r"), 1)
