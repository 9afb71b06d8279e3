"""A hierarchical VAE: a VDVAE-style top-down ladder of latent groups (Child 2021).

Bottom-up: a 3x3 stem, then one stage per resolution from the image's down to the coarsest,
each `encoder_blocks[s]` residual blocks; average pooling between stages. The activation at
the end of every stage is kept for the posterior.

Top-down: a learned constant at the coarsest resolution, then per stage `latent_groups[s]`
blocks, each carrying one latent group z_i (`latent_channels` x r x r):

    prior      p(z_i | z_<i)    = N(mu_p, sigma_p)   from h (the first group: N(0, I))
    posterior  q(z_i | x, z_<i) = N(mu_q, sigma_q)   from [h, encoder activation at r]
    h <- h + prior feature; h <- h + proj(z_i); h <- residual block(h)

then nearest-neighbour upsampling to the next stage, and a 1x1 conv to the output
likelihood's parameters. A stage with no latent group gets one deterministic block.

The model's flat latent (`latent_shape` = (D,), D = all groups' dimensions) is the *whitened*
noise eps_i = (z_i - mu_p) / sigma_p of every group, so the generic interfaces work unchanged:
`decode(eps)` runs the prior pass z_i = mu_p + sigma_p * eps_i; `decode(t * eps)` with eps ~
N(0, I) samples at temperature t (every group's prior scale times t, VDVAE's sampling), and
`encode(x)` returns the posterior-mean pass in eps units, so `decode(encode(x)[0])` is the
reconstruction from posterior means. The ELBO, the per-group KLs and the importance weights
come from `forward` and `log_weights`, which use the true hierarchical posterior.

Log-scales of the prior and posterior are computed in float32 and softly bounded to
[-b, b] (b * tanh(s / b)), so no exp() can overflow under bf16/fp16 autocast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vae_scale.errors import ConfigError
from vae_scale.losses import kl_normal, kl_normal_standard
from vae_scale.models.base import VAE, VAEOutput, register
from vae_scale.schema import FieldError, NonNegative, NonNegativeFloat, Positive, Section

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class HierarchicalVAEConfig(Section):
    """The VDVAE-style hierarchical VAE (vae_scale/models/hierarchical.py)."""

    name: Literal["hierarchical"] = "hierarchical"
    # Top-down stages, coarsest first; the last one is the image's resolution.
    resolutions: Annotated[list[Positive], Field(min_length=1)] = Field(
        default_factory=lambda: [1, 4, 8, 16, 32]
    )
    widths: list[Positive] = Field(default_factory=lambda: [128, 128, 128, 64, 32])
    latent_groups: list[NonNegative] = Field(default_factory=lambda: [1, 2, 2, 2, 1])
    encoder_blocks: list[NonNegative] = Field(default_factory=lambda: [2, 2, 2, 2, 2])
    latent_channels: Positive = 16  # channels of every group's z
    bottleneck: Annotated[float, Field(gt=0, le=1)] = 0.25  # blocks' inner width fraction
    # Soft bound b on prior/posterior log-scales: s -> b * tanh(s / b), in float32 (0 = off).
    log_scale_bound: NonNegativeFloat = 5.0
    grad_checkpoint: bool = False  # recompute residual blocks in backward (deep models)

    @model_validator(mode="after")
    def _one_entry_per_stage(self) -> HierarchicalVAEConfig:
        stages = len(self.resolutions)
        for key in ("widths", "latent_groups", "encoder_blocks"):
            if len(getattr(self, key)) != stages:
                raise FieldError(
                    key,
                    f"expected one entry per stage of model.resolutions ({stages}), got "
                    f"{getattr(self, key)!r}",
                )
        for i, (low, high) in enumerate(zip(self.resolutions, self.resolutions[1:])):
            if high <= low or high % low:
                raise FieldError(
                    f"resolutions[{i + 1}]",
                    f"expected increasing resolutions, each a multiple of the one before, got "
                    f"{self.resolutions!r}",
                )
        if self.latent_groups[0] < 1:
            # the top of the ladder (and with no group there, its encoder stage feeds nothing)
            raise FieldError(
                "latent_groups[0]",
                f"expected at least one latent group at the coarsest resolution, got "
                f"{self.latent_groups!r}",
            )
        return self


class Block(nn.Module):
    """VDVAE's bottleneck block: GELU-1x1, GELU-kxk, GELU-kxk, GELU-1x1 (k = 3, or 1 on maps
    smaller than 3x3), plus the input when `residual`."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, kernel: int, residual: bool):
        super().__init__()
        pad = kernel // 2
        self.convs = nn.ModuleList(
            [
                nn.Conv2d(c_in, c_mid, 1),
                nn.Conv2d(c_mid, c_mid, kernel, padding=pad),
                nn.Conv2d(c_mid, c_mid, kernel, padding=pad),
                nn.Conv2d(c_mid, c_out, 1),
            ]
        )
        self.residual = residual
        self.grad_checkpoint = False  # set by the model

    @property
    def last(self) -> nn.Conv2d:
        return self.convs[-1]

    def _body(self, x: Tensor) -> Tensor:
        out = x
        for conv in self.convs:
            out = conv(F.gelu(out))
        return x + out if self.residual else out

    def forward(self, x: Tensor) -> Tensor:
        if self.grad_checkpoint and self.training and torch.is_grad_enabled():
            # Non-reentrant: works with DDP and autocast, and keeps the RNG state.
            return checkpoint(self._body, x, use_reentrant=False)
        return self._body(x)


class GroupStats(NamedTuple):
    """One latent group's draw, float32, (B, zdim, r, r) each."""

    z: Tensor
    kl: Tensor  # KL(q || p) per dimension (posterior passes), else empty
    log_pq: Tensor  # log p(z | z_<i) - log q(z | x, z_<i) per dimension (posterior passes)
    eps_mean: Tensor  # posterior mean in whitened units (posterior-mean pass)
    eps_logvar: Tensor  # posterior log-variance in whitened units (posterior-mean pass)
    mu: Tensor  # posterior mean mu_q (posterior passes) or prior mean mu_p (prior pass)
    logvar: Tensor  # posterior log-variance (posterior passes) or the prior's (prior pass)


Mode = Literal["sample", "mean", "prior"]


class TopDownBlock(nn.Module):
    """One latent group: prior and posterior from the current features, then the update of h."""

    def __init__(
        self, width: int, mid: int, zdim: int, kernel: int, top: bool, scale: float, bound: float
    ):
        super().__init__()
        self.zdim, self.top, self.bound = zdim, top, bound
        self.posterior = Block(2 * width, mid, 2 * zdim, kernel, residual=False)
        # The first group's prior is N(0, I): its input is a constant anyway, and it makes a
        # one-group model exactly the single-latent VAE.
        self.prior = None if top else Block(width, mid, 2 * zdim + width, kernel, residual=False)
        if self.prior is not None:  # start as N(0, I) with no feature: a stable first step
            nn.init.zeros_(self.prior.last.weight)
            nn.init.zeros_(self.prior.last.bias)
        self.z_proj = nn.Conv2d(zdim, width, 1)
        self.res = Block(width, mid, width, kernel, residual=True)
        with torch.no_grad():  # VDVAE: deep residual sums start small
            self.z_proj.weight.mul_(scale)
            self.res.last.weight.mul_(scale)

    def _log_scale(self, raw: Tensor) -> Tensor:
        raw = raw.float()
        return self.bound * torch.tanh(raw / self.bound) if self.bound > 0 else raw

    def forward(
        self, h: Tensor, act: Tensor | None, eps: Tensor, mode: Mode
    ) -> tuple[Tensor, GroupStats]:
        if self.prior is None:
            p_mu = p_ls = torch.zeros((), device=h.device)  # broadcasts: N(0, I)
        else:
            out = self.prior(h)
            p_mu, p_ls_raw, feature = out.split(
                [self.zdim, self.zdim, out.shape[1] - 2 * self.zdim], 1
            )
            p_mu, p_ls = p_mu.float(), self._log_scale(p_ls_raw)
            h = h + feature
        empty = h.new_empty(0, dtype=torch.float32)
        if mode == "prior":
            z = p_mu + torch.exp(p_ls) * eps
            stats = GroupStats(z, empty, empty, empty, empty, p_mu, 2 * p_ls)
        else:
            q_mu, q_ls_raw = self.posterior(torch.cat([h, act], 1)).chunk(2, 1)
            q_mu, q_ls = q_mu.float(), self._log_scale(q_ls_raw)
            if self.top:  # the single-latent VAE's KL formula, to the last bit
                kl = kl_normal_standard(q_mu, 2 * q_ls)
            else:
                kl = kl_normal(q_mu, 2 * q_ls, p_mu, 2 * p_ls)
            if mode == "mean":
                z = q_mu
                eps_mean = (q_mu - p_mu) * torch.exp(-p_ls)
                stats = GroupStats(z, kl, empty, eps_mean, 2 * (q_ls - p_ls), q_mu, 2 * q_ls)
            else:
                z = q_mu + torch.exp(q_ls) * eps
                # log N(z; mu_q, s_q) from eps directly: no cancellation in (z - mu_q)
                log_q = -0.5 * eps.pow(2) - q_ls
                log_p = -0.5 * ((z - p_mu) * torch.exp(-p_ls)).pow(2) - p_ls
                stats = GroupStats(z, kl, log_p - log_q, empty, empty, q_mu, 2 * q_ls)
        h = h + self.z_proj(z)
        return self.res(h), stats


@register(HierarchicalVAEConfig)
class HierarchicalVAE(VAE):
    def build(self, cfg: HierarchicalVAEConfig, channels: int, height: int, width: int) -> None:
        res = list(cfg.resolutions)
        if height != width or height != res[-1]:
            raise ConfigError(
                f"model.resolutions: the last stage must be the image's resolution; images are "
                f"{height}x{width}, the last stage is {res[-1]}x{res[-1]}"
            )
        self.resolutions, self.zdim = res, cfg.latent_channels
        # built (and so initialised) in this order: bottom-up, finest stage first, then top-down
        self.stem, self.enc_stages, self.enc_down = _bottom_up_modules(cfg, channels)
        self.h_top, self.dec_up, self.dec_stages, self.group_shapes, self._group_names = (
            _top_down_modules(cfg)
        )
        self.out = nn.Conv2d(cfg.widths[-1], self.likelihood.param_channels(channels), 1)
        self.group_sizes = [c * h * w for c, h, w in self.group_shapes]
        for module in self.modules():
            if isinstance(module, Block):
                module.grad_checkpoint = cfg.grad_checkpoint

    # ------------------------------------------------------------------ interface

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (sum(self.group_sizes),)

    @property
    def latent_group_names(self) -> list[str]:
        return list(self._group_names)

    def split_groups(self, flat: Tensor) -> list[Tensor]:
        """(B, D) -> one (B, zdim, r, r) tensor per group."""
        parts = flat.split(self.group_sizes, dim=1)
        return [
            rearrange(p, "b (c h w) -> b c h w", c=c, h=h, w=w)
            for p, (c, h, w) in zip(parts, self.group_shapes, strict=True)
        ]

    @staticmethod
    def join_groups(parts: Sequence[Tensor]) -> Tensor:
        return torch.cat([p.flatten(1) for p in parts], dim=1)

    def bottom_up(self, x: Tensor) -> list[Tensor]:
        """Encoder activations per top-down stage."""
        h = self.stem(x)
        acts: list[Tensor] = [h] * len(self.resolutions)
        for s in reversed(range(len(self.resolutions))):
            h = self.enc_stages[s](h)
            acts[s] = h
            if s > 0:
                factor = self.resolutions[s] // self.resolutions[s - 1]
                h = self.enc_down[s - 1](F.avg_pool2d(h, factor))
        return acts

    def top_down(
        self, batch: int, acts: list[Tensor] | None, eps: list[Tensor], mode: Mode
    ) -> tuple[Tensor, list[GroupStats]]:
        """The decoder pass: `eps` one standard-normal tensor per group (posterior noise when
        mode is 'sample', prior noise when 'prior', unused when 'mean'). Returns the output
        likelihood's parameters and every group's statistics."""
        h = self.h_top.unsqueeze(0).expand(batch, -1, -1, -1)
        stats: list[GroupStats] = []
        for s, blocks in enumerate(self.dec_stages):
            if s > 0:
                factor = self.resolutions[s] // self.resolutions[s - 1]
                h = self.dec_up[s - 1](F.interpolate(h, scale_factor=factor, mode="nearest"))
            for block in blocks:
                if isinstance(block, TopDownBlock):
                    act = None if acts is None else acts[s]
                    h, st = block(h, act, eps[len(stats)], mode)
                    stats.append(st)
                else:
                    h = block(h)
        return self.out(h), stats

    def _noise(self, batch: int, eps: Tensor | None, like: Tensor) -> list[Tensor]:
        if eps is None:
            return [torch.randn((batch, *s), device=like.device) for s in self.group_shapes]
        return [e.float() for e in self.split_groups(eps)]

    def forward(self, x: Tensor, eps: Tensor | None = None, samples: int = 1) -> VAEOutput:
        """Posterior samples z_i = mu_q + sigma_q * eps_i (eps: (samples * B, D) or drawn
        here); the bottom-up pass runs once and, with samples > 1, is shared by the draws,
        draw-major as in `VAE.forward`."""
        acts = self.bottom_up(x)
        if samples > 1:
            acts = [repeat(a, "b ... -> (k b) ...", k=samples) for a in acts]
        rows = samples * len(x)
        x_params, stats = self.top_down(rows, acts, self._noise(rows, eps, x), "sample")
        return VAEOutput(
            x_params,
            self.join_groups([st.z for st in stats]),
            self.join_groups([st.mu for st in stats]),
            self.join_groups([st.logvar for st in stats]),
            {name: st.kl for name, st in zip(self._group_names, stats, strict=True)},
        )

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The posterior-mean pass in whitened units (see the module docstring)."""
        acts = self.bottom_up(x)
        empty = [x.new_empty(0)] * len(self.group_shapes)
        _, stats = self.top_down(len(x), acts, empty, "mean")
        return (
            self.join_groups([st.eps_mean for st in stats]),
            self.join_groups([st.eps_logvar for st in stats]),
        )

    def decode(self, z: Tensor) -> Tensor:
        """Prior pass from whitened noise `z` (B, D): z_i = mu_p + sigma_p * eps_i."""
        return self.top_down(len(z), None, [e.float() for e in self.split_groups(z)], "prior")[0]

    def log_weights(self, x: Tensor, eps: Tensor) -> Tensor:
        """log p(x, z) - log q(z | x) of n posterior samples per image: eps (n, B, D) -> (n, B).
        The encoder runs once per image; its activations are shared by the n samples."""
        n, batch = eps.shape[:2]
        acts = [a.repeat(n, *([1] * (a.dim() - 1))) for a in self.bottom_up(x)]
        flat = eps.flatten(0, 1)
        x_params, stats = self.top_down(n * batch, acts, self._noise(n * batch, flat, x), "sample")
        log_px = -self.likelihood.nll(x_params, x.repeat(n, *([1] * (x.dim() - 1))))
        log_pq = sum(st.log_pq.flatten(1).sum(1) for st in stats)
        return (log_px + log_pq).view(n, batch)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        temperature: float | Sequence[float] = 1.0,
    ) -> Tensor:
        """n images from the prior with every group's prior scale times its temperature."""
        device = next(self.parameters()).device
        eps = torch.randn((n, *self.latent_shape), generator=generator, device="cpu")
        scale = torch.cat(
            [
                torch.full((size,), t)
                for size, t in zip(self.group_sizes, per_group(temperature, self), strict=True)
            ]
        )
        return self.likelihood.mean(self.decode((eps * scale).to(device)))


def per_group(temperature: float | Sequence[float], model: HierarchicalVAE) -> list[float]:
    """One temperature per latent group of `model` from a number or a per-group list."""
    groups = len(model.group_shapes)
    if isinstance(temperature, (int, float)):
        return [float(temperature)] * groups
    temps = [float(t) for t in temperature]
    if len(temps) != groups:
        raise ConfigError(
            f"temperature: expected one value or one per latent group ({groups}), got {len(temps)}"
        )
    return temps


def _kernel(r: int) -> int:
    return 3 if r > 2 else 1


def _bottom_up_modules(cfg: HierarchicalVAEConfig, channels: int) -> tuple[nn.Module, ...]:
    """The encoder: the stem, each stage's residual blocks (module lists are indexed by
    top-down stage) and enc_down[s], from stage s+1 (finer) to stage s."""
    res, widths = list(cfg.resolutions), list(cfg.widths)
    stem = nn.Conv2d(channels, widths[-1], 3, padding=1)
    stages = nn.ModuleList()
    for s, r in enumerate(res):
        mid = max(1, int(widths[s] * cfg.bottleneck))
        blocks = [
            Block(widths[s], mid, widths[s], _kernel(r), residual=True)
            for _ in range(cfg.encoder_blocks[s])
        ]
        for block in blocks:
            with torch.no_grad():
                block.last.weight.mul_(math.sqrt(1.0 / max(1, sum(cfg.encoder_blocks))))
        stages.append(nn.Sequential(*blocks))
    down = nn.ModuleList([_width_change(widths[s + 1], widths[s]) for s in range(len(res) - 1)])
    return stem, stages, down


def _top_down_modules(cfg: HierarchicalVAEConfig) -> tuple[Any, ...]:
    """The decoder: the learned top input, dec_up[s-1] from stage s-1 to s, each stage's
    top-down blocks (a stage without latents gets a residual block), and every latent
    group's shape and name."""
    res, widths, zdim = list(cfg.resolutions), list(cfg.widths), cfg.latent_channels
    scale = math.sqrt(1.0 / sum(max(g, 1) for g in cfg.latent_groups))
    # 3-D, so channels_last leaves it alone (DDP warned about a 1x1 map's ambiguous strides)
    h_top = nn.Parameter(torch.zeros(widths[0], res[0], res[0]))
    up = nn.ModuleList([_width_change(widths[s - 1], widths[s]) for s in range(1, len(res))])
    stages = nn.ModuleList()
    shapes: list[tuple[int, int, int]] = []
    names: list[str] = []
    for s, r in enumerate(res):
        mid = max(1, int(widths[s] * cfg.bottleneck))
        blocks: list[nn.Module] = []
        for _ in range(cfg.latent_groups[s]):
            top = not shapes
            blocks.append(
                TopDownBlock(widths[s], mid, zdim, _kernel(r), top, scale, cfg.log_scale_bound)
            )
            names.append(f"group{len(shapes)}_{r}x{r}")
            shapes.append((zdim, r, r))
        if not blocks:  # a stage without latents still transforms the features
            block = Block(widths[s], mid, widths[s], _kernel(r), residual=True)
            with torch.no_grad():
                block.last.weight.mul_(scale)
            blocks.append(block)
        stages.append(nn.ModuleList(blocks))
    return h_top, up, stages, shapes, names


def _width_change(c_in: int, c_out: int) -> nn.Module:
    return nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)
