"""Terms that make latents diffuse well (vae_scale/objectives/equivariance.py) and fine-tuning
an existing autoencoder (model.init_from): their math against hand computations, training
through `vae-scale train`, bitwise resume across a term's start under SIGKILL, and 2 processes
equal to 1 on the same global batch."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
from test_autoencoder import (  # noqa: F401 (blob_shards: a fixture)
    CONFIG,
    HAVE_WEIGHTS,
    SHARED_WEIGHTS,
    blob_shards,
    build,
    cli,
    tiny,
)
from test_resume import final_state

from conftest import REPO
from helpers.processes import kill_after_rows, one_and_two
from vae_scale.config import load_config
from vae_scale.errors import ConfigError
from vae_scale.objectives.equivariance import EquivarianceConfig, Transform, draw
from vae_scale.training import checkpoint

EQ_START = 6  # the equivariance term's first optimizer step in the tiny runs
EQ = [
    "loss.equivariance.weight=1", f"loss.equivariance.start_step={EQ_START}",
    "loss.discriminator.weight=0", "train.epochs=1",
]  # fmt: skip


# ------------------------------------------------------------------------------- equivariance


def test_equivariance_draws_are_pure_honour_p_prior_and_never_the_identity():
    cfg = EquivarianceConfig(weight=1, p_prior=0.3, start_step=5)
    draws = [draw(cfg, 7, step) for step in range(4005)]
    assert all(d is None for d in draws[:5])  # before the start
    again = [draw(cfg, 7, step) for step in range(4005)]
    assert [repr(d) for d in draws] == [repr(d) for d in again]  # (seed, step) decide
    assert [repr(d) for d in draws] != [repr(draw(cfg, 8, s)) for s in range(4005)]
    drawn = [d for d in draws[5:] if d is not None]
    assert abs(1 - len(drawn) / 4000 - 0.3) < 3 * (0.3 * 0.7 / 4000) ** 0.5  # 3 sigma
    assert all(d.scale != 1 or d.k for d in drawn)
    assert {d.scale for d in drawn} == {0.5, 0.75} and {d.k for d in drawn} == {0, 1, 2, 3}
    scale = EquivarianceConfig(weight=1, variant="scale", p_prior=0)
    assert {(d.scale, d.k) for d in (draw(scale, 0, s) for s in range(200))} == {
        (0.5, 0),
        (0.25, 0),
    }
    with pytest.raises(ValueError, match="identity"):
        EquivarianceConfig(weight=1, scales=[1.0], rotations=[0])


def halving(n: int) -> torch.Tensor:
    """The (n/2, n) matrix of a 2x antialiased bilinear downscale, by its definition: output
    pixel i (centre 2i + 1 in input units) weighs input pixel j (centre j + 0.5) by the
    triangle filter widened 2x, max(0, 1 - |distance| / 2), rows normalised (edges clipped)."""
    w = torch.tensor(
        [[max(0.0, 1 - abs(j + 0.5 - (2 * i + 1)) / 2) for j in range(n)] for i in range(n // 2)]
    )
    return w / w.sum(1, keepdim=True)


def halved(t: torch.Tensor) -> torch.Tensor:
    return halving(t.shape[-2]) @ t @ halving(t.shape[-1]).T


def test_equivariance_transform_against_a_hand_computation():
    assert torch.allclose(halving(4), torch.tensor([[3, 3, 1, 0], [0, 1, 3, 3]]) / 7)
    z = torch.arange(2 * 4 * 4, dtype=torch.float32).view(1, 2, 4, 4)
    # downscaled, then 90 degrees counter-clockwise (numpy's rot90 on the spatial axes)
    expected = np.rot90(halved(z).numpy(), 1, axes=(2, 3))
    assert np.allclose(Transform(0.5, 1).latent(z).numpy(), expected, atol=1e-5)
    x = torch.rand(1, 3, 8, 6)
    image = Transform(0.5, 1).image(x, (3, 4))  # rotated 6x8, then to the decoded 3x4
    assert image.shape == (1, 3, 3, 4)
    assert torch.allclose(image, halved(torch.rot90(x, 1, (2, 3))), atol=1e-6)


def test_equivariance_term_equals_its_definition_and_trains_both_halves(tmp_path):
    from vae_scale.objectives.reconstruction import pixel_error

    cfg, _, objective, nets = build(
        tmp_path, "loss.equivariance.weight=2", "loss.equivariance.p_prior=0",
        "loss.equivariance.scales=[0.5]", "loss.equivariance.rotations=[1]",
        "loss.discriminator.weight=0",
    )  # fmt: skip
    vae = nets["vae"].unwrapped
    x = torch.rand(4, 3, 16, 16)
    torch.manual_seed(3)
    with_term = objective.loss(nets, x, 0)
    torch.manual_seed(3)
    z = vae(x).z  # the same posterior draw
    decoded = vae.decode(torch.rot90(halved(z), 1, (2, 3)))
    target = halved(torch.rot90(x, 1, (2, 3))) * 2 - 1
    # 8x8 decoded images: below LPIPS's 16 px, the term is the pixel part alone
    by_hand = pixel_error(decoded, target, "l1").flatten(1).sum(1)
    assert torch.allclose(with_term.terms["equivariance"], by_hand, rtol=1e-5)
    cfg.loss.equivariance.weight = 0  # the same loss without the term
    torch.manual_seed(3)
    without = objective.loss(nets, x, 0)
    assert "equivariance" not in without.terms
    assert with_term.loss.item() == pytest.approx(
        without.loss.item() + 2 * by_hand.mean().item(), rel=1e-5
    )
    (with_term.loss - without.loss).backward()  # the term alone reaches encoder and decoder
    assert vae.net.encoder.conv_in.weight.grad.abs().sum() > 0
    assert vae.net.decoder.conv_out.weight.grad.abs().sum() > 0


def test_equivariance_belongs_to_the_autoencoder(tmp_path):
    with pytest.raises(ConfigError, match="loss.equivariance.weight"):
        load_config(REPO / "configs" / "frey_conv.yaml", ["loss.equivariance.weight=1"])
    with pytest.raises(ConfigError, match="rotations"):
        load_config(CONFIG, ["loss.equivariance.rotations=[4]"])


@pytest.mark.slow
def test_equivariance_trains_and_resumes_bitwise_across_its_start_after_sigkill(
    blob_shards,  # noqa: F811
    tmp_path,
):
    reference = cli("train", str(CONFIG), *tiny(blob_shards, tmp_path, "ref", *EQ))
    assert reference.returncode == 0, reference.stderr[-3000:]
    rows = [json.loads(r) for r in (tmp_path / "ref" / "steps.jsonl").read_text().splitlines()]
    # a row's global_step counts the update its loss made: optimizer step global_step - 1
    term = {r["global_step"] - 1: r["train/step_equivariance"] for r in rows}
    assert all(v == 0 for step, v in term.items() if step < EQ_START)
    assert sum(1 for step, v in term.items() if step >= EQ_START and v > 0) >= 3  # p_prior 0.5
    assert rows[-1]["train/step_pixel_l1"] < rows[0]["train/step_pixel_l1"]  # it learns

    args = ["train", str(CONFIG), *tiny(blob_shards, tmp_path, "killed", *EQ)]
    kill_after = random.Random(os.getpid()).randint(5, 7)  # the last checkpoint at step 4
    log = tmp_path / "killed" / "steps.jsonl"
    kill_after_rows(args, log, kill_after)
    ckpt = checkpoint.latest_checkpoint(log.parent / "checkpoints")
    assert checkpoint.read_train_state(ckpt)["opt_step"] < EQ_START  # resumes across it
    done = cli(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    params, steps, epochs = final_state(log.parent, ("model", "ema"))
    params_ref, steps_ref, epochs_ref = final_state(tmp_path / "ref", ("model", "ema"))
    assert steps == steps_ref and epochs == epochs_ref  # every logged term, bitwise
    for key in params_ref:
        assert torch.equal(params[key], params_ref[key]), key


@pytest.mark.slow
def test_equivariance_two_processes_equal_one_on_the_same_global_batch(tmp_path):
    term = ["loss.equivariance.weight=1", "loss.equivariance.p_prior=0.3",
            "loss.perceptual.weight=0", "loss.discriminator.weight=0"]  # fmt: skip
    a, b = one_and_two("autoencoder_probe.py", term, tmp_path)
    assert (a["num_processes"], b["num_processes"]) == (1, 2)
    assert any(row["equivariance"] > 0 for row in a["rows"])
    for row_a, row_b in zip(a["rows"], b["rows"], strict=True):
        for key in row_a:
            assert row_b[key] == pytest.approx(row_a[key], rel=1e-4, abs=1e-5), key
    for key, value in a["model"].items():
        if not key.endswith("to_k.bias"):  # its true gradient is 0 (test_autoencoder.py)
            assert np.allclose(value, b["model"][key], atol=2e-5), key


# ------------------------------------------------------------------------- model.init_from


def diffusers_folder(path, seed: int = 5, **change):
    """A tiny AutoencoderKL saved by diffusers itself (the layout of a Hub download), shaped
    like the tiny runs' model unless `change`d."""
    from diffusers import AutoencoderKL

    from vae_scale.models.autoencoder_kl import AutoencoderKLConfig, diffusers_config

    section = AutoencoderKLConfig(widths=[16, 16, 16], groups=8, layers_per_block=1)
    torch.manual_seed(seed)
    net = AutoencoderKL(**{**diffusers_config(section, (3, 16, 16)), **change}).eval()
    net.save_pretrained(path, safe_serialization=True)
    return net


def test_init_from_a_diffusers_folder_decodes_as_diffusers_does(tmp_path):
    net = diffusers_folder(tmp_path / "sd_vae")
    _, _, objective, nets = build(tmp_path, f"model.init_from={tmp_path / 'sd_vae'}")
    z = torch.randn(2, 4, 4, 4)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        for vae in (nets["vae"].unwrapped, nets["vae"].ema.module):  # the EMA starts there too
            assert torch.equal(vae.decode(z), net.decode(z).sample)
            assert torch.equal(vae.encode(x)[0], net.encode(x * 2 - 1).latent_dist.mean)
    assert objective.init_from["format"] == "diffusers"
    assert objective.init_from["path"] == str((tmp_path / "sd_vae").resolve())


def test_init_from_refuses_a_mismatched_folder_naming_the_field_or_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    diffusers_folder(tmp_path / "c8", latent_channels=8)
    with pytest.raises(ConfigError, match="latent_channels = 8"):
        build(tmp_path, f"model.init_from={tmp_path / 'c8'}")
    diffusers_folder(tmp_path / "bent")
    weights = tmp_path / "bent" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["decoder.conv_out.weight"] = torch.zeros(3, 16, 1, 1)
    save_file(state, weights)
    with pytest.raises(ConfigError, match=r"'decoder.conv_out.weight'.*\(3, 16, 1, 1\)"):
        build(tmp_path, f"model.init_from={tmp_path / 'bent'}")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text(
        (tmp_path / "bent" / "config.json").read_text()
    )
    with pytest.raises(ConfigError, match="never loaded"):
        build(tmp_path, f"model.init_from={tmp_path / 'pickled'}")
    with pytest.raises(ConfigError, match="does not exist"):
        build(tmp_path, f"model.init_from={tmp_path / 'nowhere'}")
    with pytest.raises(ConfigError, match="train.freeze: 'encoder.nothing'"):
        build(tmp_path, "train.freeze=[encoder.nothing]")


@pytest.mark.slow
def test_fine_tune_through_the_cli_records_its_origin_and_chains(blob_shards, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    diffusers_folder(tmp_path / "sd_vae")
    frozen = ["train.freeze=[net.encoder.*]", "loss.discriminator.weight=0", "train.epochs=1"]
    args = tiny(blob_shards, tmp_path, "ft", f"model.init_from={tmp_path / 'sd_vae'}", *frozen)
    done = cli("train", str(CONFIG), *args)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert record["init_from"]["format"] == "diffusers"
    ckpt = checkpoint.latest_checkpoint(tmp_path / "ft" / "checkpoints")
    tuned = load_file(ckpt / "model.safetensors")
    source = load_file(tmp_path / "sd_vae" / "diffusion_pytorch_model.safetensors")
    # the frozen encoder kept the folder's weights; the decoder trained away from them
    assert torch.equal(tuned["net.encoder.conv_in.weight"], source["encoder.conv_in.weight"])
    assert not torch.equal(tuned["net.decoder.conv_out.weight"], source["decoder.conv_out.weight"])
    # a resume keeps the record (and does not load the folder again: it may be gone)
    (tmp_path / "sd_vae" / "diffusion_pytorch_model.safetensors").unlink()
    again = cli("train", str(CONFIG), *args, "train.epochs=2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (
        json.loads((tmp_path / "ft" / "config.json").read_text())["init_from"]
        == record["init_from"]
    )
    exported = cli("export", str(tmp_path / "ft"), str(tmp_path / "export"))
    assert exported.returncode == 0, exported.stderr[-3000:]
    card = (tmp_path / "export" / "README.md").read_text()
    assert f"fine-tuned from the diffusers autoencoder `{record['init_from']['path']}`" in card
    # a vae_scale export starts the next fine-tune with exactly its weights
    _, _, objective, nets = build(tmp_path, f"model.init_from={tmp_path / 'export'}")
    mine = nets["vae"].unwrapped.state_dict()
    for key, value in load_file(tmp_path / "export" / "model.safetensors").items():
        assert torch.equal(mine[key], value), key
    assert objective.init_from["format"] == "vae_scale"


# ---------------------------------------------------------------------------------- alignment

ALIGN = [
    "loss.alignment.weight=0.5", "loss.alignment.teacher=vgg16",
    f"loss.alignment.start_step={EQ_START}", "loss.discriminator.weight=0", "train.epochs=1",
]  # fmt: skip
needs_vgg = pytest.mark.skipif(not HAVE_WEIGHTS, reason="../shared/weights not here")


def test_vf_loss_against_a_hand_computation():
    from vae_scale.objectives.alignment import AlignmentConfig, vf_loss

    cfg = AlignmentConfig(weight=1, margin_cos=0.1, margin_distmat=0.05)
    gen = torch.Generator().manual_seed(0)
    z, f = torch.randn(2, 3, 2, 2, generator=gen), torch.randn(2, 3, 2, 2, generator=gen)
    cos_term, dist_term = vf_loss(z, f, cfg)
    for b in range(2):
        zs = [z[b, :, i, j].numpy() for i in range(2) for j in range(2)]
        fs = [f[b, :, i, j].numpy() for i in range(2) for j in range(2)]

        def cos(u, v):
            return float(u @ v / np.linalg.norm(u) / np.linalg.norm(v))

        by_hand = np.mean([max(0.0, 1 - 0.1 - cos(u, v)) for u, v in zip(zs, fs)])
        assert cos_term[b].item() == pytest.approx(by_hand, rel=1e-5)
        pairs = [
            max(0.0, abs(cos(zs[i], zs[j]) - cos(fs[i], fs[j])) - 0.05)
            for i in range(4)
            for j in range(4)
        ]
        assert dist_term[b].item() == pytest.approx(np.mean(pairs), rel=1e-5, abs=1e-7)
    # aligned latents cost nothing
    assert vf_loss(f * 3, f, cfg)[0].abs().max() < 1e-6
    assert vf_loss(f * 3, f, cfg)[1].abs().max() < 1e-6
    schedule = AlignmentConfig(weight=1, schedule="linear", schedule_steps=10, start_step=5)
    assert [schedule.factor(s) for s in (5, 10, 15, 99)] == pytest.approx([1, 0.55, 0.1, 0.1])


@needs_vgg
def test_alignment_term_trains_projection_and_encoder_from_its_start(tmp_path):
    from vae_scale.training.state import TrainState
    from vae_scale.training.step import train_step

    cfg, accelerator, objective, nets = build(tmp_path, *ALIGN[:-1])
    assert set(nets) == {"vae", "alignment_projection"} and "teacher" in objective.frozen()
    projection = nets["alignment_projection"].unwrapped
    assert projection.weight.shape == (512, 4, 1, 1)  # VGG16 relu4_3 features per position
    before = projection.weight.detach().clone()
    state, x = TrainState(), torch.rand(4, 3, 16, 16)
    rows = [train_step(accelerator, objective, nets, x, state, 20) for _ in range(EQ_START + 2)]
    assert all(r.terms["vf_cos"].abs().sum() == 0 for r in rows[:EQ_START])
    assert all(r.values["alignment_weight"] == 0 for r in rows[:EQ_START])
    assert rows[EQ_START].terms["vf_cos"].sum() > 0
    assert rows[EQ_START].values["alignment_weight"] > 0
    assert not torch.equal(projection.weight, before)  # trained from its start
    # the adaptive weight compares gradients at the encoder's last layer (quant_conv)
    assert objective.vae.last_encoder_layer() is objective.vae.net.quant_conv.weight
    assert all(
        p.grad is None or p.grad.abs().sum() == 0
        for p in objective.frozen()["teacher"].parameters()
    )
    with pytest.raises(ConfigError, match="trains the encoder"):
        build(tmp_path, *ALIGN[:-1], "train.trainable=decoder")


def test_teachers_load_dinov2_from_timm_and_torch_hub_files_and_say_what_is_missing(tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    from vae_scale.perception.teachers import load_teacher

    torch.manual_seed(0)
    net = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, num_classes=0, dynamic_img_size=True
    ).eval()
    save_file(net.state_dict(), tmp_path / "model.safetensors")
    hub = {**net.state_dict(), "mask_token": torch.zeros(1, 384)}  # torch hub's layout
    torch.save(hub, tmp_path / "dinov2_vits14_pretrain.pth")
    images = torch.rand(2, 3, 20, 20)
    resized = torch.nn.functional.interpolate(
        images, size=(56, 56), mode="bilinear", antialias=True
    )
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        tokens = net.forward_features((resized - mean) / std)[:, 1:]
    expected = tokens.transpose(1, 2).reshape(2, 384, 4, 4)
    for path in (tmp_path, tmp_path / "dinov2_vits14_pretrain.pth"):
        teacher = load_teacher("dinov2_vits14", str(path), None)
        assert torch.allclose(teacher(images, (4, 4)), expected, atol=1e-5), path
    found = load_teacher("dinov2_vits14", None, str(tmp_path))  # by torch hub's file name
    assert torch.allclose(found(images, (4, 4)), expected, atol=1e-5)
    with pytest.raises(ConfigError, match="dinov2_vitb14_pretrain.pth"):
        load_teacher("dinov2_vitb14", None, str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="not dinov2_vitb14's weights"):
        load_teacher("dinov2_vitb14", str(tmp_path / "model.safetensors"), None)


@pytest.mark.slow
@needs_vgg
def test_alignment_resumes_bitwise_across_its_start_after_sigkill(blob_shards, tmp_path):  # noqa: F811
    reference = cli("train", str(CONFIG), *tiny(blob_shards, tmp_path, "ref", *ALIGN))
    assert reference.returncode == 0, reference.stderr[-3000:]
    rows = [json.loads(r) for r in (tmp_path / "ref" / "steps.jsonl").read_text().splitlines()]
    cos = {r["global_step"] - 1: r["train/step_vf_cos"] for r in rows}
    assert all(v == 0 for s, v in cos.items() if s < EQ_START)
    assert all(v > 0 for s, v in cos.items() if s >= EQ_START)
    args = ["train", str(CONFIG), *tiny(blob_shards, tmp_path, "killed", *ALIGN)]
    log = tmp_path / "killed" / "steps.jsonl"
    kill_after = random.Random(os.getpid()).randint(5, 7)  # the last checkpoint at step 4
    kill_after_rows(args, log, kill_after)
    ckpt = checkpoint.latest_checkpoint(log.parent / "checkpoints")
    assert checkpoint.read_train_state(ckpt)["opt_step"] < EQ_START
    done = cli(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    weights = ("model", "model_1", "ema")  # model_1: the projection
    params, steps, epochs = final_state(log.parent, weights)
    params_ref, steps_ref, epochs_ref = final_state(tmp_path / "ref", weights)
    assert steps == steps_ref and epochs == epochs_ref
    for key in params_ref:
        assert torch.equal(params[key], params_ref[key]), key


@pytest.mark.slow
@needs_vgg
def test_alignment_two_processes_equal_one_with_accumulation(tmp_path):
    term = ["loss.alignment.weight=0.5", "loss.alignment.teacher=vgg16",
            f"run.weights_dir={SHARED_WEIGHTS}", "loss.perceptual.weight=0",
            "loss.discriminator.weight=0"]  # fmt: skip
    a, b = one_and_two("autoencoder_probe.py", ["--accum", "2", *term], tmp_path)
    assert (a["num_processes"], b["num_processes"]) == (1, 2)
    assert a["rows"][-1]["vf_cos"] > 0 and a["rows"][-1]["alignment_weight"] > 0
    for row_a, row_b in zip(a["rows"], b["rows"], strict=True):
        for key in row_a:
            assert row_b[key] == pytest.approx(row_a[key], rel=1e-4, abs=1e-5), key
    for part in ("model", "networks"):
        for key, value in a[part].items():
            if not key.endswith("to_k.bias"):
                assert np.allclose(value, b[part][key], atol=2e-5), (part, key)
