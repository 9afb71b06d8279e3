"""A loss term weighted by taming's adaptive weight, ||grad rec|| / ||grad term|| at one layer,
computed over the *global* batch of each optimizer step (the GAN term at the decoder's last
layer; the alignment term at the encoder's last layer, as VA-VAE's).

One batch per optimizer step: the two last-layer gradients are averaged over processes and
the term weighted at once. Several (accumulation): the term's gradient and the last-layer
gradients are accumulated apart (one more backward through the autoencoder per batch) and
weighted in `before_update`, once the whole step's batches are in, so that accumulation makes
the update of one whole batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


def last_layer_grads(rec_loss: Tensor, term: Tensor, last_layer: nn.Parameter) -> Tensor:
    """The gradients of the reconstruction loss and the term at `last_layer`, stacked (2, ...)
    in float32: what the adaptive weight compares."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    term_grad = torch.autograd.grad(term, last_layer, retain_graph=True)[0]
    return torch.stack([rec_grad.float(), term_grad.float()])


def adaptive_weight(grads: Tensor, max_weight: float) -> Tensor:
    """taming's ||grad rec|| / (||grad term|| + 1e-4), clamped to [0, max_weight], detached;
    `grads` as `last_layer_grads` stacks them (over the global batch of the step)."""
    rec_grad, term_grad = grads.unbind()
    return (rec_grad.norm() / (term_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


class AdaptiveTerm:
    """A term's weighting: `weighted(vae, rec_loss, term, weight)` in the loss of each batch,
    `before_update(vae)` at the optimizer step (returns the adaptive weight the step used, or
    None when the term did not run in it)."""

    def __init__(
        self,
        accelerator: Any,
        layer: Callable[[nn.Module], nn.Parameter],
        adaptive: bool,
        max_weight: float,
    ):
        self.accelerator, self.layer = accelerator, layer
        self.adaptive, self.max_weight = adaptive, max_weight
        self.pending: dict[str, Any] | None = None  # the step's weight or term gradients

    def weighted(self, vae: nn.Module, rec_loss: Tensor, term: Tensor, weight: float) -> Tensor:
        """This batch's share of `weight` x adaptive weight x `term` (zero with accumulation:
        its gradient is kept for `before_update`)."""
        accum = self.accelerator.gradient_accumulation_steps
        grads = last_layer_grads(rec_loss, term, self.layer(vae)) if self.adaptive else None
        if accum == 1:
            factor = torch.ones((), device=term.device)
            if grads is not None:
                factor = adaptive_weight(self.mean(grads), self.max_weight)
            self.pending = {"weight": factor}
            return weight * factor * term
        params = [p for p in vae.parameters() if p.requires_grad]
        term_grads = torch.autograd.grad(term / accum, params, retain_graph=True, allow_unused=True)
        if self.pending is None:
            self.pending = {
                "grads": [torch.zeros_like(p) for p in params], "last": None, "scale": weight
            }  # fmt: skip
        for total, g in zip(self.pending["grads"], term_grads):
            if g is not None:
                total.add_(g)
        if grads is not None:
            last = self.pending["last"]
            self.pending["last"] = grads / accum if last is None else last + grads / accum
        return torch.zeros((), device=term.device)

    def before_update(self, vae: nn.Module) -> Tensor | None:
        """At the optimizer step: with accumulation, the step's term gradient, averaged over
        processes and weighted by the global batch's adaptive weight, is added to the
        autoencoder's gradients."""
        pending, self.pending = self.pending, None
        if pending is None:
            return None
        if "grads" in pending:
            factor = torch.ones((), device=pending["grads"][0].device)
            if pending["last"] is not None:
                factor = adaptive_weight(self.mean(pending["last"]), self.max_weight)
            params = [p for p in vae.parameters() if p.requires_grad]
            flat = self.mean(torch.cat([g.flatten() for g in pending["grads"]]))
            scale = pending["scale"] * factor
            for p, g in zip(params, flat.split([p.numel() for p in params])):
                update = scale * g.view_as(p)
                p.grad = update if p.grad is None else p.grad.add_(update)
            pending["weight"] = factor
        return pending["weight"]

    def mean(self, t: Tensor) -> Tensor:
        """`t`'s mean over processes (itself on one process)."""
        acc = self.accelerator
        return t if acc.num_processes == 1 else acc.reduce(t, "mean")
