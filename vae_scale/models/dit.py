"""A small diffusion transformer (DiT, Peebles & Xie 2023; as SiT uses it): the network of the
diffusion probe (`loss.objective: flow_matching`), not a VAE. Latents (C, h, w) are cut into
p x p patches, embedded with fixed 2-D sin-cos positions, and pass `depth` transformer blocks
conditioned on the time by adaLN-Zero (each block's shift, scale and gate from the time
embedding, the gates and the output layer zero at initialization, so the network starts as
the zero map); the output is the velocity, unpatchified to (C, h, w)."""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import Field, model_validator
from torch import Tensor, nn

from vae_scale.models.base import register
from vae_scale.schema import FieldError, Positive, Section


class DiTConfig(Section):
    """The probe's transformer; ~0.4M parameters at the defaults, ~3M at width 256, depth 4."""

    name: Literal["dit"] = "dit"
    patch_size: Positive = 2
    width: Positive = 128
    depth: Positive = 2
    heads: Positive = 4
    mlp_ratio: Annotated[float, Field(gt=0)] = 4.0

    @model_validator(mode="after")
    def _heads_divide_width(self) -> DiTConfig:
        if self.width % self.heads:
            raise FieldError("width", f"{self.width} is not divisible by model.heads={self.heads}")
        return self


def sincos_positions(width: int, rows: int, cols: int) -> Tensor:
    """Fixed 2-D sin-cos position embeddings (rows * cols, width), as DiT/MAE make them."""
    quarter = width // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(
        torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64),
        indexing="ij",
    )  # fmt: skip
    parts = []
    for coord in (ys.flatten(), xs.flatten()):
        angles = coord[:, None] * freqs[None]
        parts += [angles.sin(), angles.cos()]
    out = torch.cat(parts, 1)
    return F.pad(out, (0, width - out.shape[1])).float()


def time_features(t: Tensor, dim: int = 256) -> Tensor:
    """Sinusoidal features of t in [0, 1] (scaled by 1000, as diffusion timesteps are)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
    angles = 1000 * t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], 1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width)
        )
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        nn.init.zeros_(self.ada[1].weight)  # adaLN-Zero: every block starts as the identity
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=1)
        q, k, v = rearrange(
            self.qkv(modulate(self.norm1(x), shift1, scale1)), "b n (three h d) -> three b h n d",
            three=3, h=self.heads,
        )  # fmt: skip
        attended = rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)")
        x = x + gate1[:, None] * self.proj(attended)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


@register(DiTConfig)
class DiT(nn.Module):
    """velocity = DiT(x_t, t) for latents x_t (B, C, h, w) and times t (B,) in [0, 1]."""

    kind = "denoiser"  # trained by a diffusion objective, not as a VAE

    def __init__(self, cfg: DiTConfig, image_shape: tuple[int, int, int], likelihood: object):
        super().__init__()
        c, h, w = self.image_shape = tuple(image_shape)
        p = self.patch = cfg.patch_size
        if h % p or w % p:
            raise FieldError(
                "model.patch_size", f"{p} does not divide the {h}x{w} latents; pick a divisor"
            )
        self.embed = nn.Conv2d(c, cfg.width, p, stride=p)
        self.register_buffer("positions", sincos_positions(cfg.width, h // p, w // p), False)
        self.time = nn.Sequential(
            nn.Linear(256, cfg.width), nn.SiLU(), nn.Linear(cfg.width, cfg.width)
        )
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.width, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 2 * cfg.width))
        self.out = nn.Linear(cfg.width, p * p * c)
        for layer in (self.ada[1], self.out):  # the output starts at zero
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        c, h, w = self.image_shape
        tokens = rearrange(self.embed(x), "b d y x -> b (y x) d") + self.positions
        cond = self.time(time_features(t))
        for block in self.blocks:
            tokens = block(tokens, cond)
        shift, scale = self.ada(cond).chunk(2, dim=1)
        out = self.out(modulate(self.norm(tokens), shift, scale))
        p = self.patch
        return rearrange(
            out, "b (y x) (p q c) -> b c (y p) (x q)", y=h // p, x=w // p, p=p, q=p, c=c
        )
