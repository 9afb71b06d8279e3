"""Which pretrained networks an evaluation uses (eval.lpips, eval.rfid: auto | on | off).

auto: LPIPS for RGB images when its weights are on this machine (grey digits and faces get
PSNR/SSIM only: LPIPS is defined on natural RGB images, and VGG on every MNIST test image costs
far more than the model), rFID when pytorch-fid and its weights are here. Nothing is
downloaded in auto mode; `on` insists (LPIPS may then download through torchvision) and a
missing network is an error naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vae_scale.errors import ConfigError
from vae_scale.perception.fid import InceptionFeatures, Unavailable
from vae_scale.perception.lpips import LPIPS, MIN_SIDE
from vae_scale.perception.weights import VGG16, find_weights, missing_message


@dataclass
class PerceptionNets:
    lpips: LPIPS | None = None
    inception: InceptionFeatures | None = None
    unavailable: dict[str, str] = field(default_factory=dict)  # metric -> why not


def perception_networks(
    lpips_mode: str,
    rfid_mode: str,
    image_shape: tuple[int, ...],
    weights_dir: str | None,
    device: torch.device | str,
    lpips: LPIPS | None = None,
) -> PerceptionNets:
    """The networks asked for, for images of `image_shape` (C, H, W); `lpips`: one already
    loaded (the training loss's)."""
    nets = PerceptionNets()
    if lpips_mode == "on" or (lpips_mode == "auto" and image_shape[0] == 3):
        if min(image_shape[1:]) < MIN_SIDE:
            why = f"LPIPS-VGG needs images of at least {MIN_SIDE}x{MIN_SIDE}"
            if lpips_mode == "on":
                raise ConfigError(f"eval.lpips: on: {why}")
            nets.unavailable["lpips"] = why
        elif lpips is not None:
            nets.lpips = lpips
        elif lpips_mode == "on" or find_weights(VGG16, weights_dir):
            nets.lpips = LPIPS.pretrained(weights_dir).to(device)
        else:
            nets.unavailable["lpips"] = missing_message(VGG16, weights_dir)
    if rfid_mode != "off":
        try:
            inception = InceptionFeatures.pretrained(weights_dir, download=rfid_mode == "on")
            nets.inception = inception.to(device)
        except Unavailable as why:
            if rfid_mode == "on":
                raise ConfigError(f"eval.rfid: on: {why}") from None
            nets.unavailable["rfid"] = str(why)
    return nets
