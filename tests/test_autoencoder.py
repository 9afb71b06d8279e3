"""Sharp autoencoders: the KL autoencoder (diffusers' AutoencoderKL) trained with pixel +
LPIPS + KL + PatchGAN terms on the one loop; LPIPS with real weights; PSNR/SSIM/LPIPS/rFID;
latent statistics and a diffusers export."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file
from test_resume import final_state

from conftest import REPO
from helpers.processes import kill_after_rows, one_and_two
from vae_scale.config import load_config
from vae_scale.errors import ConfigError
from vae_scale.perception.fid import frechet_distance
from vae_scale.perception.image_metrics import psnr, ssim
from vae_scale.perception.lpips import LPIPS
from vae_scale.training import checkpoint

SHARED_WEIGHTS = REPO.parent / "shared" / "weights"
HAVE_WEIGHTS = (SHARED_WEIGHTS / "vgg16_features.safetensors").is_file()
needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason="../shared/weights not here")
CONFIG = REPO / "configs" / "celeba64_autoencoder.yaml"
START = 10  # the discriminator's first optimizer step in the tiny runs


def blobs(n: int, seed: int, size: int = 16):
    """Coloured Gaussian blobs on noise: RGB images with edges for the discriminator."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        cy, cx = rng.uniform(4, size - 4, 2)
        radius = rng.uniform(2, 5)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
        img = blob[..., None] * rng.uniform(0.2, 1, 3) + 0.1 * rng.random((size, size, 3))
        yield {"__key__": f"{i:06d}", "npy": (np.clip(img, 0, 1) * 255).astype(np.uint8)}


@pytest.fixture(scope="module")
def blob_shards(tmp_path_factory) -> Path:
    from vae_scale.data.sourcing.base import SourceData
    from vae_scale.data.sourcing.shards import write_dataset

    out = tmp_path_factory.mktemp("shards")
    # small val and test splits: rFID runs Inception at 299 px on each image twice
    splits = {"train": list(blobs(256, 0)), "val": list(blobs(12, 1)), "test": list(blobs(12, 2))}
    write_dataset(SourceData("blobs", (3, 16, 16), splits, {"synthetic": True}), out / "blobs", 64)
    return out


def tiny(shards: Path, run_dir: Path, name: str = "ae", *extra: str) -> list[str]:
    weights = (
        [f"run.weights_dir={SHARED_WEIGHTS}"] if HAVE_WEIGHTS else ["loss.perceptual.weight=0"]
    )
    return [
        f"data.shards_dir={shards}", "data.dataset=blobs", "data.batch_size=16",
        "data.num_workers=0", f"run.dir={run_dir}", f"run.name={name}", "wandb.mode=disabled",
        "model.widths=[16,16,16]", "model.groups=8", "model.layers_per_block=1",
        f"loss.discriminator.start_step={START}", "loss.discriminator.layers=2",
        "loss.discriminator.channels=8", "loss.discriminator.lecam_weight=0.01",
        "train.mixed_precision=no", "train.channels_last=false", "train.lr=1e-3",
        "train.epochs=2", "train.log_every_steps=1", "train.checkpoint_every_steps=4",
        "train.keep_checkpoints=100", "train.ema_decay=0.9", "eval.picture_epochs=[]",
        "eval.latent_stats_samples=64", *weights, *extra,
    ]  # fmt: skip


def cli(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "vae_scale", *args], env=env, capture_output=True, text=True,
        timeout=300, cwd=REPO, **kw,
    )  # fmt: skip


# ------------------------------------------------------------------------- perception


@needs_weights
def test_lpips_with_shared_weights_equals_the_lpips_package():
    lpips = pytest.importorskip("lpips")
    ours = LPIPS.pretrained(str(SHARED_WEIGHTS))
    reference = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    vgg = load_file(SHARED_WEIGHTS / "vgg16_features.safetensors")
    slices = [getattr(reference.net, f"slice{i}") for i in range(1, 6)]
    for key, value in vgg.items():
        index, kind = key.split(".")[1:]
        for part in slices:
            if index in part._modules:
                getattr(part._modules[index], kind).data.copy_(value)
    torch.manual_seed(0)
    x = torch.rand(6, 3, 64, 64)
    noisy = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    other = torch.rand(6, 3, 64, 64)
    for y in (noisy, other, x):
        expected = reference(x * 2 - 1, y * 2 - 1).flatten()
        assert torch.allclose(ours(x, y), expected, atol=1e-6), (ours(x, y), expected)
    assert ours(x, x).abs().max() < 1e-6
    assert ours(x, noisy).mean() < ours(x, other).mean()


@needs_weights
def test_lpips_is_frozen_and_gives_gradients_to_images_only():
    net = LPIPS.pretrained(str(SHARED_WEIGHTS)).train()  # train() cannot unfreeze it
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    x = torch.rand(2, 3, 32, 32)
    y = torch.rand(2, 3, 32, 32, requires_grad=True)
    net(x, y).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())


def test_lpips_weights_missing_offline_is_one_line_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("VAE_SCALE_WEIGHTS", raising=False)

    def offline(*_a, **_k):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(ConfigError) as err:
        LPIPS.pretrained(str(tmp_path / "empty"))
    message = str(err.value)
    assert "\n" not in message
    assert "vgg16_features.safetensors" in message and "vgg16-397923af.pth" in message
    assert str(tmp_path / "empty") in message and str(tmp_path / "torch") in message
    assert "downloading it failed" in message


def test_a_stalled_weights_download_ends_with_one_line(tmp_path, monkeypatch):
    """A server that accepts the connection and never answers (a stalled proxy): the start
    ends after the download timeout, not never."""
    import dataclasses
    import socket
    import time

    from vae_scale.perception import weights

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    url = f"http://127.0.0.1:{server.getsockname()[1]}/vgg16-397923af.pth"
    monkeypatch.setattr(weights, "DOWNLOAD_TIMEOUT_S", 1.0)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("VAE_SCALE_WEIGHTS", raising=False)
    for proxy in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    spec = dataclasses.replace(weights.VGG16, url=url)
    started = time.monotonic()
    try:
        with pytest.raises(ConfigError, match="downloading it failed .*timed out"):
            weights.load_pretrained(spec, str(tmp_path / "empty"))
    finally:
        server.close()
    assert time.monotonic() - started < 30
    assert socket.getdefaulttimeout() is None  # the process's sockets as they were


def test_psnr_and_ssim_against_direct_formulas():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 20, 24)
    y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    mse = (x - y).pow(2).flatten(1).mean(1)
    assert torch.allclose(psnr(x, y), 10 * torch.log10(1 / mse))
    assert torch.allclose(psnr(x, x), torch.full((3,), 100.0))
    assert torch.allclose(ssim(x, x), torch.ones(3), atol=1e-5)
    # one channel of one image by hand: Gaussian-weighted moments at every valid position
    a, b = x[0, 0].double().numpy(), y[0, 0].double().numpy()
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    values = []
    for i in range(a.shape[0] - 10):
        for j in range(a.shape[1] - 10):
            pa, pb = a[i : i + 11, j : j + 11], b[i : i + 11, j : j + 11]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * pa * pa).sum() - ma**2, (w * pb * pb).sum() - mb**2
            cov = (w * pa * pb).sum() - ma * mb
            c1, c2 = 0.01**2, 0.03**2
            values.append(
                ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
            )
    assert ssim(x[:1, :1], y[:1, :1]).item() == pytest.approx(np.mean(values), abs=1e-5)
    assert ssim(x, y).mean() < 0.99


HAVE_FID_WEIGHTS = (SHARED_WEIGHTS / "pt_inception-2015-12-05.safetensors").is_file()


@pytest.mark.slow  # pytorch-fid's own sqrtm of 2048 x 2048 takes ~17 s on 2 cores
@pytest.mark.skipif(not HAVE_FID_WEIGHTS, reason="../shared/weights has no FID Inception")
def test_rfid_equals_pytorch_fids_own_computation(tmp_path, monkeypatch):
    """Our rFID (features summed in float64 over batches, offline weights from the shared
    safetensors) against pytorch-fid's own: its InceptionV3 loading its .pth from torch's
    cache, its activations, np.cov and calculate_frechet_distance, on the same images."""
    from pytorch_fid.fid_score import calculate_frechet_distance
    from pytorch_fid.inception import InceptionV3
    from safetensors.torch import load_file

    from vae_scale.analysis.evaluate import perception_metrics, perception_sums
    from vae_scale.perception.networks import perception_networks

    images = torch.from_numpy(np.stack([b["npy"] for b in blobs(12, 5, size=32)]))
    real = images.permute(0, 3, 1, 2).float() / 255
    fake = real + 0.1 * torch.randn(real.shape, generator=torch.Generator().manual_seed(0))
    fake = torch.nn.functional.avg_pool2d(fake, 3, 1, 1).clamp(0, 1)
    nets = perception_networks("off", "on", (3, 32, 32), str(SHARED_WEIGHTS), "cpu")
    sums: dict[str, torch.Tensor] = {}
    for batch in range(0, 12, 8):
        part = perception_sums(nets, real[batch : batch + 8], fake[batch : batch + 8])
        sums = {k: sums.get(k, 0) + v for k, v in part.items()}
    sums["count"] = torch.tensor(12.0)
    ours = perception_metrics(sums, "test", nets)["test/rfid"]
    # pytorch-fid unchanged, its weights file written from the shared one (its README's way)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    state = load_file(SHARED_WEIGHTS / "pt_inception-2015-12-05.safetensors")
    torch.save(state, checkpoints / "pt_inception-2015-12-05-6726825d.pth")
    model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    with torch.no_grad():
        acts = [model(x)[0].squeeze(3).squeeze(2).numpy() for x in (real, fake)]
    stats = [(a.mean(0), np.cov(a, rowvar=False)) for a in acts]
    theirs = calculate_frechet_distance(*stats[0], *stats[1])
    assert ours == pytest.approx(theirs, abs=1e-3)
    assert ours > 1  # the noisy blurred copies are measurably apart


def test_frechet_distance_from_sums_matches_the_direct_formula():
    from scipy import linalg

    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 8))
    b = rng.normal(0.3, 1.2, size=(400, 8))[:500]
    b = np.concatenate([b, rng.normal(0.3, 1.2, size=(100, 8))])

    def sums(f):
        t = torch.tensor(f)
        return t.sum(0), t.T @ t

    fid = frechet_distance(*sums(a)[:1], sums(a)[1], *sums(b), n=500)
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    direct = ((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real)
    assert fid == pytest.approx(direct, rel=1e-8)
    assert frechet_distance(*sums(a), *sums(a), n=500) == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------- the objective


def build(tmp_path: Path, *extra: str):
    """The objective and its prepared networks, for a tiny config on one process."""
    from vae_scale.training.setup import build_training

    cfg = load_config(CONFIG, tiny(tmp_path, tmp_path, "unit", *extra))
    accelerator = Accelerator(cpu=True)
    set_seed(0)
    return cfg, accelerator, *build_training(cfg, accelerator, (3, 16, 16))


def test_terms_finite_discriminator_silent_before_start_and_isolated_after(tmp_path):
    from vae_scale.objectives.autoencoder import DISCRIMINATOR_TERMS
    from vae_scale.objectives.discriminator import discriminator_loss

    cfg, accelerator, objective, nets = build(tmp_path, "loss.discriminator.lecam_weight=0")
    vae, disc = nets["vae"], nets["discriminator"]
    assert objective.start_step("discriminator") == START and objective.start_step("vae") == 0
    x = torch.rand(8, 3, 16, 16)
    before = objective.loss(nets, x, START - 1)
    before.loss.backward()
    assert all(before.terms[k].abs().sum() == 0 for k in DISCRIMINATOR_TERMS)
    assert all(p.grad is None for p in disc.unwrapped.parameters())  # not even run
    assert objective.before_update(nets, START - 1) == {"adaptive_weight": 0.0}
    vae.unwrapped.zero_grad(set_to_none=True)

    torch.manual_seed(1)  # the posterior draw, again below
    after = objective.loss(nets, x, START)
    for name, value in after.terms.items():
        assert torch.isfinite(value).all(), name
    assert after.terms["gan"].abs().sum() > 0
    after.loss.backward()
    assert objective.before_update(nets, START)["adaptive_weight"] > 0
    disc_grads = [p.grad.clone() for p in disc.unwrapped.parameters()]
    assert any(g.abs().sum() > 0 for g in disc_grads)
    # The discriminator's gradients are those of its own loss alone: the autoencoder's GAN
    # term reached the autoencoder through detached discriminator weights.
    disc.unwrapped.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    recon = vae.unwrapped(x).x_params.detach()
    real, fake = disc.model(torch.cat([x * 2 - 1, recon])).chunk(2)
    assert torch.equal(real.flatten(1).mean(1), after.terms["logits_real"])
    discriminator_loss(real, fake, cfg.loss.discriminator.loss).backward()
    for ours, alone in zip(disc_grads, disc.unwrapped.parameters(), strict=True):
        assert torch.allclose(ours, alone.grad, atol=1e-7)
    for frozen in objective.frozen().values():
        assert all(p.grad is None for p in frozen.parameters())
    # evaluation's per-image terms: the same discriminator, its mean is the batch's loss
    terms = objective.eval_terms(vae.unwrapped, x, recon)
    assert set(terms) == set(objective.eval_term_names())
    real, fake = disc.unwrapped(torch.cat([x * 2 - 1, recon])).detach().chunk(2)
    loss = discriminator_loss(real, fake, cfg.loss.discriminator.loss)
    assert terms["discriminator_loss"].mean() == pytest.approx(loss.item(), rel=1e-6)
    assert terms["pixel_l1"].mean() == pytest.approx((recon - (x * 2 - 1)).abs().mean().item())


def test_decoder_only_training_freezes_the_encoder(tmp_path):
    from vae_scale.training.state import TrainState
    from vae_scale.training.step import train_step

    cfg, accelerator, objective, nets = build(tmp_path, "train.trainable=decoder")
    vae = nets["vae"].unwrapped
    encoder = {k: v.clone() for k, v in vae.net.encoder.state_dict().items()}
    decoder = {k: v.clone() for k, v in vae.net.decoder.state_dict().items()}
    state = TrainState()
    for _ in range(3):
        train_step(accelerator, objective, nets, torch.rand(4, 3, 16, 16), state, 10)
    assert all(torch.equal(encoder[k], v) for k, v in vae.net.encoder.state_dict().items())
    assert any(not torch.equal(decoder[k], v) for k, v in vae.net.decoder.state_dict().items())


def test_config_refuses_what_the_objective_cannot_do(tmp_path):
    for override, key in [
        ("loss.likelihood=logistic", "loss.likelihood"),
        ("train.mixed_precision=fp16", "train.mixed_precision"),
        ("loss.free_bits=0.5", "loss.free_bits"),
        ("loss.discriminator.loss=wasserstein", "loss.discriminator.loss"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(CONFIG, tiny(tmp_path, tmp_path, "x", override))
    with pytest.raises(ConfigError, match=r"loss\.discriminator\.layers"):
        build(tmp_path, "loss.discriminator.layers=3")  # 16 px: no patch left
    # a config written before the renames reads under the new names
    from vae_scale.config import config_from_dict

    raw = {"model": {"name": "autoencoder_kl"}, "data": {"crop": 8},
           "train": {"grad_accum_steps": 2},
           "loss": {"objective": "autoencoder", "likelihood": "gaussian",
                    "adversarial": {"start_step": 7}}}  # fmt: skip
    old = config_from_dict(raw)
    assert old.loss.discriminator.start_step == 7 and old.data.random_crop == 8
    assert old.train.grad_accum_batches == 2


# ----------------------------------------------------------------- through the real CLI


@pytest.fixture(scope="module")
def trained(blob_shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs")
    done = cli("train", str(CONFIG), *tiny(blob_shards, run_dir, "ref"))
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir / "ref"


@pytest.mark.slow
def test_training_learns_and_the_discriminator_waits_for_its_start(trained):
    rows = [json.loads(r) for r in (trained / "steps.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in rows] == list(range(1, 33))
    first, last = rows[0], rows[-1]
    assert last["train/step_pixel_l1"] < 0.8 * first["train/step_pixel_l1"]
    if HAVE_WEIGHTS:
        assert last["train/step_lpips"] < first["train/step_lpips"]
    for row in rows:
        started = row["global_step"] > START  # the row of step S is logged after update S-1
        assert (row["train/step_discriminator_loss"] != 0) == started, row
        assert (row["train/discriminator_grad_norm"] > 0) == started
        assert (row["train/adaptive_weight"] > 0) == started
        assert all(np.isfinite(v) for v in row.values() if isinstance(v, float))
    ckpts = {checkpoint.checkpoint_step(p): p for p in (trained / "checkpoints").iterdir()}
    disc_at = {s: load_file(p / "model_1.safetensors") for s, p in ckpts.items()}
    for key, value in disc_at[4].items():
        assert torch.equal(value, disc_at[8][key])  # untouched before its start
    assert any(not torch.equal(v, disc_at[16][k]) for k, v in disc_at[8].items())
    model_keys = load_file(ckpts[32] / "model.safetensors").keys()
    assert not any("features" in k or "heads" in k for k in model_keys)  # LPIPS not saved
    metrics = [json.loads(r) for r in (trained / "metrics.jsonl").read_text().splitlines()]
    for key in ("test/psnr", "test/ssim", "test/bpd", "train/lpips"):
        assert np.isfinite(metrics[-1][key]), key
    # the latents' diffusability after the last epoch (iFID with the shared Inception)
    last = metrics[-1]
    assert 0 < last["test/latent_high_freq_share"] < 1 and last["test/scale_equivariance_psnr"] > 0
    assert last["test/diffusability_samples"] == 12 and "test/latent_std_c3" in last
    assert ("test/ifid" in last) == HAVE_FID_WEIGHTS and last.get("test/ifid", 1) > 0
    # the objective's own terms are evaluated on val and test too
    for split in ("val", "test"):
        for term in ("pixel_l1", "gan", "discriminator_loss", "logits_real", "logits_fake"):
            assert np.isfinite(metrics[-1][f"{split}/{term}"]), (split, term)
    assert ("test/lpips" in metrics[-1]) == HAVE_WEIGHTS
    stats = json.loads((trained / "latent_stats.json").read_text())
    assert len(stats["latents_mean"]) == 4 and stats["samples"] == 64
    assert 0 < stats["scaling_factor"] < 100


@pytest.mark.slow
def test_sigkill_before_the_discriminator_starts_resumes_bitwise_across_it(
    blob_shards, tmp_path, trained
):
    args = ["train", str(CONFIG), *tiny(blob_shards, tmp_path, "killed")]
    kill_after = random.Random(os.getpid()).randint(5, 9)  # last checkpoint at step 4 or 8
    log = tmp_path / "killed" / "steps.jsonl"
    kill_after_rows(args, log, kill_after)
    resumed = checkpoint.read_train_state(checkpoint.latest_checkpoint(log.parent / "checkpoints"))
    assert resumed["opt_step"] < START  # the resumed run crosses the start itself
    done = cli(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    weights = ("model", "model_1", "ema")
    params, steps, epochs = final_state(log.parent, weights)
    params_ref, steps_ref, epochs_ref = final_state(trained, weights)
    assert steps == steps_ref  # every logged term, bitwise
    assert epochs == epochs_ref
    assert params.keys() == params_ref.keys()
    for key in params:
        assert torch.equal(params[key], params_ref[key]), key
    assert json.loads(
        (log.parent / "checkpoints" / "step_00000032" / "lecam.json").read_text()
    ) == json.loads((trained / "checkpoints" / "step_00000032" / "lecam.json").read_text())


@pytest.mark.slow
def test_eval_export_loads_in_diffusers_and_decodes_identically(trained, tmp_path):
    from diffusers import AutoencoderKL

    import vae_scale

    done = cli("eval", str(trained), "--iw-samples", "0")
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("test/psnr", "test/ssim", "test/bpd", "test/rfid"):
        assert name in done.stdout
    result = json.loads((trained / "eval_test.json").read_text())
    if HAVE_FID_WEIGHTS:  # offline, from the shared weights
        assert result["test/rfid"] > 0 and result["test/ifid"] > 0
        metrics = [json.loads(r) for r in (trained / "metrics.jsonl").read_text().splitlines()]
        assert metrics[-1]["test/rfid"] == pytest.approx(result["test/rfid"], rel=1e-6)
    else:  # the weights file is named
        assert result["test/rfid"] is None and "pt_inception" in result["test/rfid_unavailable"]
    if HAVE_WEIGHTS:
        assert 0 < result["test/lpips"] < 1
    out = tmp_path / "export"
    done = cli("export", str(trained), str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = AutoencoderKL.from_pretrained(out)
    ours = vae_scale.from_pretrained(out)
    stats = json.loads((trained / "latent_stats.json").read_text())
    assert theirs.config.scaling_factor == pytest.approx(stats["scaling_factor"])
    assert theirs.config.shift_factor == pytest.approx(stats["shift_factor"])
    z = torch.randn(3, *ours.latent_shape)
    with torch.no_grad():
        assert torch.equal(theirs.decode(z).sample, ours.vae.decode(z))
        x = ours.sample(3)
        assert torch.equal(theirs.encode(x * 2 - 1).latent_dist.mean, ours.encode(x).mean)
    # SDXL's pipelines would switch to a per-channel convention if these were set
    assert theirs.config.latents_mean is None and theirs.config.latents_std is None
    record = json.loads((out / "vae_scale.json").read_text())
    assert record["export"]["fp16"]["images"] == "val" and record["export"]["fp16"]["safe"]
    assert record["export"]["latent_stats"]["weights"] == "ema"  # the run's own, on its EMA
    card = (out / "README.md").read_text()
    assert "AutoencoderKL.from_pretrained" in card and "scaling_factor" in card
    # the raw weights' export carries statistics measured on the raw weights
    raw = tmp_path / "raw"
    done = cli("export", str(trained), str(raw), "--weights", "raw")
    assert done.returncode == 0, done.stderr[-3000:]
    raw_stats = json.loads((raw / "vae_scale.json").read_text())["export"]["latent_stats"]
    assert (
        raw_stats["weights"] == "raw" and raw_stats["checkpoint_step"] == stats["checkpoint_step"]
    )
    assert raw_stats["scaling_factor"] != pytest.approx(stats["scaling_factor"], rel=1e-6)
    theirs_raw = AutoencoderKL.from_pretrained(raw)
    assert theirs_raw.config.scaling_factor == pytest.approx(raw_stats["scaling_factor"])


@pytest.mark.slow
def test_missing_lpips_weights_stop_training_with_one_line(blob_shards, tmp_path):
    args = tiny(blob_shards, tmp_path, "noweights", f"run.weights_dir={tmp_path / 'none'}")
    args = [a for a in args if a != "loss.perceptual.weight=0"]
    env = {"TORCH_HOME": str(tmp_path / "torch"), "https_proxy": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9"}  # fmt: skip
    env = {**{k: v for k, v in os.environ.items() if k != "VAE_SCALE_WEIGHTS"}, **env}
    done = subprocess.run(
        [sys.executable, "-m", "vae_scale", "train", str(CONFIG), *args], env=env,
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "vgg16_features.safetensors" in done.stderr and str(tmp_path / "none") in done.stderr
    assert not (tmp_path / "noweights").exists()  # a failed start leaves no run folder


@pytest.mark.slow
def test_two_processes_equal_one_on_the_same_global_batch(tmp_path):
    """Through the real `accelerate launch`: the autoencoder and discriminator after 5 steps
    (crossing the discriminator's start at step 2, adaptive weight and LeCam included)."""
    weights = (
        [f"run.weights_dir={SHARED_WEIGHTS}"] if HAVE_WEIGHTS else ["loss.perceptual.weight=0"]
    )
    a, b = one_and_two("autoencoder_probe.py", weights, tmp_path)
    assert (a["num_processes"], b["num_processes"]) == (1, 2)
    for row_a, row_b in zip(a["rows"], b["rows"], strict=True):
        for key in row_a:
            assert row_b[key] == pytest.approx(row_a[key], rel=1e-4, abs=1e-5), key
    assert a["rows"][-1]["discriminator_loss"] > 0 and a["rows"][-1]["adaptive_weight"] > 0
    for part in ("model", "discriminator"):
        for key, value in a[part].items():
            if key.endswith("to_k.bias"):
                # softmax ignores a shift shared by all keys: this bias's true gradient is
                # exactly 0, its computed one rounding noise that Adam scales to lr-size steps
                continue
            assert np.allclose(value, b[part][key], atol=2e-5), (part, key)
    assert np.allclose(a["lecam"]["averages"], b["lecam"]["averages"], atol=1e-6)


@pytest.mark.slow
def test_accumulated_batches_make_the_update_of_one_whole_batch(tmp_path):
    """2 accumulated batches of 8 make the gradients of 1 batch of 16, the discriminator
    training: the adaptive weight comes from the whole step's gradients, once, and weighs the
    GAN term of both batches (weighting each batch by its own made 6.5 % of difference).
    Without LPIPS, whose float32 VGG alone rounds batches of 8 and 16 apart by ~1e-4."""
    probe = str(REPO / "tests" / "helpers" / "autoencoder_probe.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for accum in (1, 2):
        done = subprocess.run(
            [sys.executable, probe, "--out", str(tmp_path / f"a{accum}.json"),
             "--global-batch", "16", "--accum", str(accum), "--steps", "1", "--grads",
             "loss.discriminator.start_step=0", "loss.perceptual.weight=0"],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"a{n}.json").read_text()) for n in (1, 2))
    (row_one,), (row_two,) = one["rows"], two["rows"]
    assert row_one["adaptive_weight"] > 0
    for key in row_one:
        assert row_two[key] == pytest.approx(row_one[key], rel=1e-5, abs=1e-6), key
    for net in ("vae", "discriminator"):
        pairs = [(np.array(a), np.array(b)) for a, b in zip(one["grads"][net], two["grads"][net])]
        total = np.sqrt(sum(np.sum(a**2) for a, _ in pairs))
        assert np.sqrt(sum(np.sum((a - b) ** 2) for a, b in pairs)) < 2e-5 * total, net
        for a, b in pairs:  # each tensor (one whose gradient is rounding noise, to its level)
            assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(a) + 1e-6 * total, net
    # LeCam's averages moved once, by the step's means
    assert one["lecam"]["updates"] == two["lecam"]["updates"] == 1
    assert np.allclose(one["lecam"]["averages"], two["lecam"]["averages"], atol=1e-6)


def test_likelihood_families_get_psnr_ssim_and_lpips_only_for_rgb_in_auto(frey_shards, tmp_path):
    from conftest import tiny_config
    from vae_scale.analysis.evaluate import EvalOptions, evaluate_split
    from vae_scale.losses import build_likelihood
    from vae_scale.models import build_model
    from vae_scale.perception.networks import perception_networks
    from vae_scale.training.setup import open_splits

    cfg = tiny_config("frey_conv", frey_shards, tmp_path, "model.base_channels=4")
    accelerator = Accelerator(cpu=True)
    test = open_splits(cfg, accelerator)["test"]
    shape = test.image_shape
    model = build_model(cfg.model, shape, build_likelihood(cfg.loss.likelihood, shape))
    nets = perception_networks("auto", "off", shape, str(SHARED_WEIGHTS), "cpu")
    assert nets.lpips is None and not nets.unavailable  # grey: PSNR/SSIM only
    metrics = evaluate_split(accelerator, model, test, EvalOptions(nets=nets))
    assert 0 < metrics["test/psnr"] < 100 and -1 < metrics["test/ssim"] < 1
    assert "test/lpips" not in metrics
    if HAVE_WEIGHTS:
        forced = perception_networks("on", "off", shape, str(SHARED_WEIGHTS), "cpu")
        metrics = evaluate_split(accelerator, model, test, EvalOptions(nets=forced))
        assert 0 < metrics["test/lpips"] < 1


def test_random_crops_are_windows_fresh_each_epoch_and_centred_in_evaluation(blob_shards):
    from vae_scale.config import DataConfig
    from vae_scale.data.streaming.loader import ShardSplit

    def split(name: str, workers: int = 0, crop: int | None = 8) -> ShardSplit:
        data = DataConfig(dataset="blobs", batch_size=16, random_crop=crop, num_workers=workers)
        return ShardSplit(blob_shards / "blobs", name, data, shuffle=name == "train", seed=3)

    full = {}
    for batch in split("train", crop=None).eval_batches():
        full.update(zip(batch["key"], batch["image"]))
    cropped = split("train")
    assert cropped.image_shape == (3, 8, 8)

    def windows(epoch: int, workers: int = 0) -> dict[str, torch.Tensor]:
        got = {}
        for batch in split("train", workers).train_batches(epoch):
            got.update(zip(batch["key"], batch["image"]))
        return got

    first, again, second = windows(1), windows(1, workers=2), windows(2)
    assert first.keys() == again.keys() and len(first) == 256
    assert all(torch.equal(first[k], again[k]) for k in first)  # any worker count
    offsets = set()
    for key, window in first.items():
        image = full[key]
        found = [
            (y, x) for y in range(9) for x in range(9)
            if torch.equal(image[:, y : y + 8, x : x + 8], window)
        ]  # fmt: skip
        assert found, key
        offsets.add(found[0])
    assert len(offsets) > 20  # windows all over the image
    assert sum(not torch.equal(first[k], second[k]) for k in first) > 200  # fresh each epoch
    for batch in split("test").eval_batches():
        assert batch["image"].shape[1:] == (3, 8, 8)
    test_full = {}
    for batch in split("test", crop=None).eval_batches():
        test_full.update(zip(batch["key"], batch["image"]))
    for batch in split("test").eval_batches():
        for key, window in zip(batch["key"], batch["image"], strict=True):
            assert torch.equal(test_full[key][:, 4:12, 4:12], window)
    with pytest.raises(Exception, match="data.random_crop"):
        split("train", crop=17)
