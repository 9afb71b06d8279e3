"""LPIPS (Zhang et al. 2018), VGG variant v0.1, over torchvision's VGG16: the perceptual loss
of KL autoencoders and a reconstruction metric.

The same computation as the `lpips` package's `LPIPS(net='vgg')`: inputs scaled to [-1, 1] and
normalised by its fixed shift/scale, features after relu1_2, relu2_2, relu3_3, relu4_3 and
relu5_3, each unit-normalised over channels, squared differences weighted by a learned 1x1
head, averaged over space and summed over layers. Frozen and always in eval mode: it is not
trained, checkpointed, or wrapped by DDP (it is never a submodule of a trained model).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vae_scale.perception.weights import LPIPS_VGG_HEADS, VGG16, load_pretrained

# VGG16 `features` indices whose outputs LPIPS compares (after each stage's last ReLU)
TAPS = (3, 8, 15, 22, 29)
CHANNELS = (64, 128, 256, 512, 512)
MIN_SIDE = 16  # four 2x poolings before relu5_3
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


def vgg16_features() -> nn.Sequential:
    """torchvision's `vgg16().features` up to relu5_3, with the same indices (its state dict
    keys load as they are); built here, since importing torchvision.models costs seconds."""
    layers: list[nn.Module] = []
    channels = 3
    for item in VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU(inplace=True)]
            channels = item
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """`LPIPS.pretrained(weights_dir)` loads real weights (vae_scale/perception/weights.py);
    the constructor alone gives random ones (for shapes and tests of plumbing)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = vgg16_features()
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in CHANNELS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def pretrained(cls, weights_dir: str | None = None) -> LPIPS:
        net = cls()
        vgg = load_pretrained(VGG16, weights_dir)
        convs = {
            k.removeprefix("features."): v for k, v in vgg.items() if k.startswith("features.")
        }
        convs = {k: v for k, v in convs.items() if int(k.split(".")[0]) <= TAPS[-1]}
        net.features.load_state_dict(convs)
        heads = load_pretrained(LPIPS_VGG_HEADS, weights_dir)
        net.heads.load_state_dict(
            {f"{k}.weight": heads[f"lin{k}.model.1.weight"] for k in range(5)}
        )
        return net

    def train(self, mode: bool = True) -> LPIPS:  # frozen: dropout and the like stay off
        return super().train(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-image distance (B,), float32, between images `x` and `y` with pixels in [0, 1]
        (1 or 3 channels). Gradients flow to the images, never to the network."""
        h = torch.cat([self._normalise(x), self._normalise(y)])
        total = torch.zeros(x.shape[0], device=x.device, dtype=torch.float32)
        taps = iter(zip(TAPS, self.heads, strict=True))
        tap, head = next(taps)
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i != tap:
                continue
            a, b = (unit_normalise(f.float()) for f in h.chunk(2))
            total = total + head((a - b).pow(2).to(head.weight.dtype)).float().mean((1, 2, 3))
            tap, head = next(taps, (None, None))
        return total

    def _normalise(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return ((x * 2 - 1) - self.shift) / self.scale


def unit_normalise(features: Tensor, eps: float = 1e-10) -> Tensor:
    """Each position's feature vector divided by its length (lpips' normalize_tensor)."""
    return features / (features.pow(2).sum(1, keepdim=True).sqrt() + eps)
