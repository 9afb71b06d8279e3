"""What every VAE family shares: the reparameterization trick, forward and sampling."""

from __future__ import annotations

from typing import NamedTuple

import torch
from einops import repeat
from torch import Tensor, nn

from vae_scale.errors import ConfigError
from vae_scale.losses import Likelihood
from vae_scale.schema import Section

#: model.name -> the family's network; filled by `register`, one line per family.
FAMILIES: dict[str, type[VAE]] = {}


def register(section: type[Section]):
    """Class decorator of a model family's network: `section` (its config section, whose
    `name` default is the family's name) joins the config's `model` union, and the network is
    what `build_model` builds for that name."""

    def add(cls: type[VAE]) -> type[VAE]:
        cls.config_section = section
        FAMILIES[section.model_fields["name"].default] = cls
        return cls

    return add


class VAEOutput(NamedTuple):
    x_params: Tensor  # decoder output: logits (Bernoulli) or likelihood parameters
    z: Tensor
    mu: Tensor
    logvar: Tensor
    # name -> per-dimension KL (float32) when the model computes its KLs itself (latent groups
    # with learned priors); None: KL(N(mu, exp(logvar)) || N(0, I)).
    kl_groups: dict[str, Tensor] | None = None


class VAE(nn.Module):
    """Subclasses create their layers in `build` and define `encode(x) -> (mu, logvar)` and
    `decode(z) -> x_params`.

    `likelihood` belongs to the model so that learned likelihood parameters (e.g. a per-pixel
    scale) are trained, checkpointed and synchronised like every other weight.
    """

    config_section: type[Section]  # the family's config section (set by `register`)
    kind = "vae"  # what objectives train it (objectives.base.Objective.model_kind)
    #: submodules that map an image to its posterior (frozen by `train.trainable: decoder`)
    encoder_modules: tuple[str, ...] = ("encoder", "to_posterior")

    def __init__(self, cfg: Section, image_shape: tuple[int, int, int], likelihood: Likelihood):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.likelihood = likelihood
        self.build(cfg, *self.image_shape)

    def build(self, cfg: Section, channels: int, height: int, width: int) -> None:
        """The family's layers for images of (channels, height, width), from its section
        (a family defines it; a network built by other means may leave it empty)."""

    @property
    def latent_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def latent_group_names(self) -> list[str]:
        """Keys of `VAEOutput.kl_groups` (their KLs are logged one by one); [] for one latent."""
        return []

    @property
    def single_gaussian_latent(self) -> bool:
        """True when the model has one Gaussian (mu, log_var) per image and a N(0, I) prior:
        what posterior refinement, encoder augmentation and several draws per image need."""
        return not self.latent_group_names

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def encoder_parameters(self) -> list[nn.Parameter]:
        """The encoder's weights (what `train.trainable: decoder` freezes)."""
        found = [getattr(self, name, None) for name in self.encoder_modules]
        if not all(isinstance(m, nn.Module) for m in found):
            raise ConfigError(
                f"train.trainable: 'decoder' needs a model whose encoder is separate "
                f"({type(self).__name__} has no {list(self.encoder_modules)})"
            )
        return [p for m in found for p in m.parameters()]

    def last_encoder_layer(self) -> nn.Parameter:
        """The weight of the encoder's last layer: where the alignment term's adaptive weight
        compares gradient norms (VA-VAE's)."""
        found = [getattr(self, name) for name in self.encoder_modules if hasattr(self, name)]
        return self._last_layer(found, (nn.Conv2d, nn.Linear), "alignment", "encoder")

    def last_decoder_layer(self) -> nn.Parameter:
        """The weight of the decoder's last layer: where the discriminator term's adaptive
        weight compares gradient norms (taming's `last_layer`)."""
        decoder = getattr(self, "decoder", None)
        kinds = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
        return self._last_layer(
            [decoder] if decoder is not None else [], kinds, "discriminator", "decoder"
        )

    def _last_layer(
        self, modules: list[nn.Module], kinds: tuple[type, ...], term: str, part: str
    ) -> nn.Parameter:
        layers = [m for module in modules for m in module.modules() if isinstance(m, kinds)]
        if not layers:
            raise ConfigError(
                f"loss.{term}.adaptive_weight: {type(self).__name__} has no {part} layer to "
                f"compare gradients at; set it to false"
            )
        return layers[-1].weight

    def decode(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def reparameterize(mu: Tensor, logvar: Tensor, eps: Tensor | None = None) -> Tensor:
        # float32 so exp() cannot overflow under fp16 autocast
        std = torch.exp(0.5 * logvar.float())
        if eps is None:
            eps = torch.randn_like(std)
        return (mu.float() + eps * std).to(mu.dtype)

    def forward(self, x: Tensor, eps: Tensor | None = None, samples: int = 1) -> VAEOutput:
        """Encode once, decode `samples` posterior draws per image. With samples > 1 every
        output has samples * B rows, draw-major (row k * B + i is draw k of image i), so it
        pairs with `repeat(x, "b ... -> (k b) ...")`."""
        mu, logvar = self.encode(x)
        if samples > 1:
            mu = repeat(mu, "b ... -> (k b) ...", k=samples)
            logvar = repeat(logvar, "b ... -> (k b) ...", k=samples)
        z = self.reparameterize(mu, logvar, eps)
        return VAEOutput(self.decode(z), z, mu, logvar)

    def log_weights(self, x: Tensor, eps: Tensor) -> Tensor:
        """log p(x, z) - log q(z | x), float32, for z drawn from q(z | x) with the standard
        normal noise `eps` (n, B, *latent_shape): shape (n, B). The IWAE bound's weights."""
        mu, logvar = self.encode(x)
        mu, std = mu.float(), torch.exp(0.5 * logvar.float())
        n, batch = eps.shape[:2]
        z = mu + eps * std
        params = self.decode(z.flatten(0, 1))
        log_px = -self.likelihood.nll(params, x.repeat(n, *([1] * (x.dim() - 1))))
        prior = torch.distributions.Normal(0.0, 1.0)
        posterior = torch.distributions.Normal(mu, std)
        return (
            log_px.view(n, batch)
            + prior.log_prob(z).flatten(2).sum(2)
            - posterior.log_prob(z).flatten(2).sum(2)
        )

    @torch.no_grad()
    def sample(
        self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0
    ) -> Tensor:
        """Decode n draws of z ~ N(0, temperature^2 I) into images in [0, 1]."""
        device = next(self.parameters()).device
        z = torch.randn((n, *self.latent_shape), generator=generator, device="cpu").to(device)
        return self.likelihood.mean(self.decode(z * temperature))

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Decode the posterior mean: the usual picture of a reconstruction."""
        mu, _ = self.encode(x)
        return self.likelihood.mean(self.decode(mu))


def check_single_latent(model: VAE, key: str, feature: str) -> None:
    """`feature` works on one Gaussian (mu, log_var) per image: refuse a model without that
    capability (latent groups), naming the setting (`key`) that asked for it."""
    if not model.single_gaussian_latent:
        raise ConfigError(
            f"{key}: {feature} needs one Gaussian latent (mlp, conv, resnet models); "
            f"this model has latent groups {model.latent_group_names}"
        )
