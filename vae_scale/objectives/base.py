"""What every objective is: the networks it trains and the frozen ones it uses, the single gate
of when each network trains, its training loss, and the terms evaluation reports.

The training loop knows objectives only through this class: it builds a `TrainedNetwork`
(training/networks.py) for every `NetworkSpec` an objective declares, in the order declared,
checkpoints `components()` beside them, and at each optimizer step updates the networks whose
`start_step` has come. A new objective, term or trained network is code here, never in
training/.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatch
from typing import Any, ClassVar, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from vae_scale.errors import ConfigError
from vae_scale.losses import build_likelihood
from vae_scale.models import VAE, build_model

# The config holds the objectives' sections, so nothing here imports it: `cfg` is the run's
# vae_scale.config.Config, `rules` a TrainConfig.


class Loss(NamedTuple):
    """What one batch's forward gives: `loss`, the scalar to backpropagate; `terms`, every term
    to report by name, each a 1-D tensor of rows (images, posterior draws, deformed copies)
    whose mean is the term's per-image value; `values`, scalars of the step (a schedule's
    weight). Epoch sums, steps.jsonl, W&B and the progress line take every key, so a new term
    appears everywhere once an objective returns it."""

    loss: Tensor
    terms: dict[str, Tensor]
    values: dict[str, float] | None = None


@dataclass
class NetworkSpec:
    """A network an objective trains: the module (fresh weights), the optimizer and update
    rules (train's section, or a copy with the network's own lr, betas, schedule), the decay
    of an EMA of its weights (0: none) and the optimizer step it starts training at (its lr
    schedule counts from there): `Objective.start_step`, declared once."""

    module: nn.Module
    rules: Any  # a TrainConfig
    ema_decay: float = 0.0
    start_step: int = 0


class Trained(Protocol):
    """What an objective sees of a network being trained (training/networks.py)."""

    model: nn.Module  # prepared: DDP / compile wrappers around `unwrapped`
    unwrapped: nn.Module


class Objective:
    """One objective (`loss.objective`); subclasses register in objectives/__init__.py.
    `accelerator`: the run's (autocast, averages over processes)."""

    name: ClassVar[str] = ""
    #: the kind of network in `model` it trains (a model family's `kind`)
    model_kind: ClassVar[str] = "vae"
    #: the term the progress line, the epoch line and best/* follow
    headline: ClassVar[str] = "neg_elbo"
    #: "module:Class" of its own evaluation (Class(cfg, accelerator, objective), with
    #: .evaluate(model, splits, epoch, last) -> metrics), in place of the VAE's evaluation and
    #: pictures; named, not imported: evaluation lives above the config these rooms feed
    evaluator: ClassVar[str | None] = None

    def __init__(self, cfg: Any, image_shape: tuple[int, int, int], accelerator: Any):
        self.cfg, self.image_shape, self.accelerator = cfg, tuple(image_shape), accelerator
        self.vae = self.build_vae()
        self.init_from: dict[str, Any] | None = None  # where the VAE's first weights came from

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Refuse settings this objective has no use for, raising schema.FieldError."""

    def build_vae(self) -> VAE:
        """The autoencoder (`model` section) with fresh weights; train.trainable: decoder
        freezes its encoder."""
        cfg = self.cfg
        likelihood = build_likelihood(cfg.loss.likelihood, self.image_shape)
        vae = build_model(cfg.model, self.image_shape, likelihood)
        if cfg.train.trainable == "decoder":
            for p in vae.encoder_parameters():
                p.requires_grad_(False)
        for pattern in cfg.train.freeze:
            matched = [p for name, p in vae.named_parameters() if fnmatch(name, pattern)]
            if not matched:
                names = [name for name, _ in vae.named_parameters()]
                raise ConfigError(
                    f"train.freeze: {pattern!r} matches no parameter of the model (its names "
                    f"look like {names[0]!r} ... {names[-1]!r})"
                )
            for p in matched:
                p.requires_grad_(False)
        return vae

    # ------------------------------------------------------------------ what it trains

    def networks(self) -> dict[str, NetworkSpec]:
        """The networks this objective trains, first the one whose weights a run exports
        (a checkpoint keeps them in this order: model.safetensors, model_1.safetensors, ...)."""
        train = self.cfg.train
        return {"vae": NetworkSpec(self.vae, train, train.ema_decay, self.start_step("vae"))}

    def frozen(self) -> dict[str, nn.Module]:
        """Pretrained networks it uses and never trains (not checkpointed)."""
        return {}

    def components(self) -> dict[str, Any]:
        """State of its own (state_dict / load_state_dict) that checkpoints keep."""
        return {}

    def start_step(self, name: str) -> int:
        """The optimizer step from which network `name` trains (and its terms count); its lr
        schedule counts from there. The one place that says when a network is active."""
        return 0

    # ------------------------------------------------------------------ training

    def loss(self, nets: Mapping[str, Trained], x: Tensor, step: int) -> Loss:
        """The loss of batch `x` (float pixels in [0, 1] on the device) at optimizer step
        `step`, through the prepared networks."""
        raise NotImplementedError

    #: Optional: `before_update(nets, step) -> dict` runs at an optimizer step, after the last
    #: batch's backward and before any network updates, to finish the gradients (terms weighted
    #: over the step's global batch); it returns scalars for the step's log row.
    before_update: Callable[[Mapping[str, Trained], int], dict[str, Any]] | None = None

    # ------------------------------------------------------------------ evaluation

    def eval_term_names(self) -> list[str]:
        """The names `eval_terms` returns (the same every batch)."""
        return []

    @torch.no_grad()
    def eval_terms(self, vae: VAE, x: Tensor, x_params: Tensor) -> dict[str, Tensor]:
        """Per-image values (B,) of this objective's terms beyond the ELBO's and the image
        metrics, for val/test (`x_params`: the decoder's output at a posterior draw)."""
        return {}

    def load_trained(self, checkpoint: Any) -> None:
        """Load the weights of the networks after the first (the VAE is the caller's) from a
        checkpoint folder, as Accelerate names them (model_1.safetensors, ...)."""
        from safetensors.torch import load_file

        for i, spec in enumerate(list(self.networks().values())[1:], start=1):
            spec.module.load_state_dict(load_file(checkpoint / f"model_{i}.safetensors"))
