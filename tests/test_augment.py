"""Encoder augmentation: the random affine maps do what their ranges say, the extra term trains
the encoder only, and the training loop uses and logs it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tiny_frey_config
from vae_scale.errors import ConfigError
from vae_scale.losses import build_likelihood, neg_elbo
from vae_scale.models.mlp import MLPVAE, MLPVAEConfig
from vae_scale.objectives.encoder_aug import Deformation, encoder_augmentation_terms, random_deform

AFFINE = Deformation(rotate_deg=10, scale=0.1, shear=0.1, shift_px=1.0)
SIZE = 29  # odd, so the centre of the image is a pixel centre


def point_images(n: int, dx: int, dy: int) -> torch.Tensor:
    """n copies of a 3x3 bright square at (centre + dx, centre + dy) on a dark image."""
    x = torch.zeros(n, 1, SIZE, SIZE)
    c = SIZE // 2
    x[:, :, c + dy - 1 : c + dy + 2, c + dx - 1 : c + dx + 2] = 1.0
    return x


def centres(x: torch.Tensor) -> torch.Tensor:
    """(n, 2) centre of mass (x, y) relative to the image centre, in pixels."""
    grid = torch.arange(SIZE, dtype=torch.float32) - SIZE // 2
    mass = x.sum((1, 2, 3))
    cx = (x.sum((1, 2)) * grid).sum(1) / mass
    cy = (x.sum((1, 3)) * grid).sum(1) / mass
    return torch.stack([cx, cy], 1)


def test_no_deformation_gives_back_the_images():
    x = torch.rand(4, 3, SIZE, SIZE)
    torch.testing.assert_close(random_deform(x, Deformation()), x, atol=1e-5, rtol=0)


def test_shift_moves_each_image_within_the_range():
    x = point_images(200, 0, 0)
    out = random_deform(x, Deformation(shift_px=2.0), torch.Generator().manual_seed(0))
    moved = centres(out)
    assert moved.abs().max() <= 2.0 + 1e-4
    assert moved.abs().max() > 1.5  # the range is used ...
    assert moved[:, 0].std() > 0.8 and moved[:, 1].std() > 0.8  # ... per image, both axes
    torch.testing.assert_close(out.sum((1, 2, 3)), x.sum((1, 2, 3)), rtol=1e-4, atol=1e-4)


def test_rotation_keeps_the_radius_and_stays_within_the_angle():
    x = point_images(200, 8, 0)
    out = random_deform(x, Deformation(rotate_deg=30), torch.Generator().manual_seed(1))
    moved = centres(out)
    radius = moved.norm(dim=1)
    angle = torch.rad2deg(torch.atan2(moved[:, 1], moved[:, 0]))
    assert (radius - 8).abs().max() < 0.3
    assert angle.abs().max() <= 30.5 and angle.abs().max() > 25
    assert (angle > 0).any() and (angle < 0).any()


def test_zoom_scales_the_radius_within_the_range():
    x = point_images(200, 8, 0)
    out = random_deform(x, Deformation(scale=0.25), torch.Generator().manual_seed(2))
    radius = centres(out).norm(dim=1)
    assert radius.min() >= 8 * 0.75 - 0.2 and radius.max() <= 8 * 1.25 + 0.2
    assert radius.max() - radius.min() > 3


def elastic_shifts(count: int, alpha: float, sigma: float, seed: int) -> torch.Tensor:
    """(count, 2) centre-of-mass shifts of a small square under the elastic distortion only."""
    x = point_images(count, 0, 0)
    deformation = Deformation(elastic_alpha=alpha, elastic_sigma=sigma)
    out = random_deform(x, deformation, torch.Generator().manual_seed(seed))
    return centres(out)


def test_elastic_distortion_moves_each_image_smoothly_within_alpha():
    shifts = elastic_shifts(300, 20.0, 4.0, seed=3)
    # The displacement is alpha x (uniform noise blurred by a normalised Gaussian): never more
    # than alpha per axis; blurring noise over ~4 pi sigma^2 pixels leaves a std of about
    # alpha x 0.577 / sqrt(4 pi sigma^2) = 0.81 px.
    assert shifts.abs().max() <= 20
    assert 0.5 < shifts[:, 0].std() < 1.2 and 0.5 < shifts[:, 1].std() < 1.2
    # A wider blur averages more noise: half the sigma, about twice the displacement.
    ratio = elastic_shifts(300, 20.0, 2.0, seed=3).std() / shifts.std()
    assert 1.6 < ratio < 2.4
    # Off, it is the identity.
    assert elastic_shifts(5, 0.0, 4.0, seed=3).abs().max() < 1e-4


def test_thickness_thickens_or_thins_each_image_within_the_range():
    x = point_images(200, 0, 0)  # a 3x3 square: its 3x3 dilation is 5x5, its erosion 1x1
    out = random_deform(x, Deformation(thickness=0.5), torch.Generator().manual_seed(4))
    ink = out.sum((1, 2, 3)) / 9
    # blend factor t: thicker 1 + t (25 - 9) / 9, thinner 1 - t (9 - 1) / 9, |t| <= 0.5
    assert ink.max() <= 1 + 0.5 * 16 / 9 + 1e-4 and ink.min() >= 1 - 0.5 * 8 / 9 - 1e-4
    assert (ink > 1.5).any() and (ink < 0.6).any()  # both directions, most of the range
    centre = out[:, :, SIZE // 2, SIZE // 2]
    torch.testing.assert_close(centre, torch.ones_like(centre), atol=1e-4, rtol=0)  # stays ink
    assert random_deform(x, Deformation(thickness=0.0)).sub(x).abs().max() < 1e-5


def tiny_mlp(seed: int = 0) -> MLPVAE:
    torch.manual_seed(seed)
    shape = (1, 28, 28)
    return MLPVAE(
        MLPVAEConfig(latent_dim=2, hidden=[32, 16]), shape, build_likelihood("bernoulli", shape)
    )


def grads(model: MLPVAE) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_the_augmented_term_trains_only_the_encoder():
    model = tiny_mlp()
    x = torch.rand(16, 1, 28, 28)
    encoder = {n for n, _ in model.named_parameters() if not n.startswith("decoder")}
    assert encoder and len(encoder) < len(list(model.parameters()))

    encoder_augmentation_terms(model, x, AFFINE).loss.backward()
    alone = grads(model)
    assert set(alone) == encoder  # the decoder got no gradient at all
    assert all(g.abs().sum() > 0 for g in alone.values())

    # main loss + weight * augmented term: the decoder's gradient is the main loss's exactly
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    out = model(x)
    main = neg_elbo(model.likelihood, out.x_params, x, out.mu, out.logvar).loss
    main.backward()
    main_only = grads(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    out = model(x)
    main = neg_elbo(model.likelihood, out.x_params, x, out.mu, out.logvar).loss
    (main + 3.0 * encoder_augmentation_terms(model, x, AFFINE).loss).backward()
    both = grads(model)
    for name, g in both.items():
        if name in encoder:
            assert not torch.allclose(g, main_only[name]), name
        else:
            torch.testing.assert_close(g, main_only[name], rtol=0, atol=0, msg=name)


def test_copies_average_the_term_over_independently_deformed_copies():
    model = tiny_mlp()
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        mu, logvar = model.encode(x)
    kl_real = neg_elbo(model.likelihood, model.decode(mu), x, mu, logvar).kl

    # identity deformation: every copy is the image itself (same posterior, same KL)
    same = encoder_augmentation_terms(model, x, Deformation(), copies=3)
    assert same.kl.shape == (24,)
    torch.testing.assert_close(same.kl.view(3, 8), kl_real.expand(3, 8))
    assert same.loss.item() == pytest.approx(same.neg_elbo.mean().item(), rel=1e-6)

    # deformed: the three copies of one image get different draws, so different posteriors
    torch.manual_seed(1)
    deformed = encoder_augmentation_terms(model, x, AFFINE, copies=3).kl.view(3, 8)
    assert (deformed[0] - deformed[1]).abs().min() > 0
    assert (deformed[1] - deformed[2]).abs().min() > 0
    # one copy is the default and keeps the batch size
    assert encoder_augmentation_terms(model, x, AFFINE).kl.shape == (8,)


@pytest.mark.slow
def test_training_with_encoder_augmentation_learns_and_logs_it(frey_shards, tmp_path):
    from vae_scale.training.loop import train

    run = train(
        tiny_frey_config(
            frey_shards,
            tmp_path,
            "train.epochs=2",
            "loss.encoder_aug.weight=1",
            "loss.encoder_aug.elastic_alpha=8",
            "loss.encoder_aug.thickness=0.3",
            "loss.encoder_aug.copies=2",
            "train.log_every_steps=5",
        )
    )
    epochs = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs[1]["test/neg_elbo"] < epochs[0]["test/neg_elbo"]
    steps = [json.loads(r) for r in (run / "steps.jsonl").read_text().splitlines()]
    aug = [r["train/step_encoder_aug_neg_elbo"] for r in steps]
    assert len(aug) == len(steps) > 2 and all(math.isfinite(v) and v > 0 for v in aug)
    # deformed faces are scored as images too: same scale as the real ones, not equal
    real = [r["train/step_neg_elbo"] for r in steps]
    assert all(0.5 < a / r < 2 for a, r in zip(aug, real, strict=True)) and aug != real


@pytest.mark.parametrize(
    "override",
    [
        "loss.encoder_aug.weight=-1",
        "loss.encoder_aug.scale=1",
        "loss.encoder_aug.rotate_deg=200",
        "loss.encoder_aug.shift_px=-2",
        "loss.encoder_aug.shear=-0.1",
        "loss.encoder_aug.elastic_alpha=-1",
        "loss.encoder_aug.elastic_sigma=0",
        "loss.encoder_aug.thickness=1.5",
        "loss.encoder_aug.copies=0",
    ],
)
def test_bad_augmentation_settings_name_the_key(override, frey_shards, tmp_path):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        tiny_frey_config(frey_shards, tmp_path, override)
