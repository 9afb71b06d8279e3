"""Training objectives beyond the ELBO: each term is its own file with its config section
(reconstruction.py, perceptual.py, adversarial.py); autoencoder.py combines them into the
KL autoencoder's objective that training/step.py calls."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Objective:
    """What one step minimises: `loss`, the scalar to backpropagate, and `terms`, every term
    to report by name, each a 1-D tensor of rows (images, posterior draws, deformed copies)
    whose mean is the term's per-image value. Epoch sums, steps.jsonl, W&B and the progress
    line take every key, so a new term appears everywhere once it is added to an objective."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
