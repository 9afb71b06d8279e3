"""Frozen vision foundation models whose patch features an autoencoder's latents are aligned
to (`loss.alignment.teacher`): a small registry. Each teacher maps images in [0, 1] to patch
features (B, D, h, w) on a grid the caller asks for: images are resized (bilinear,
antialiased) to grid x the teacher's stride, so one patch lies over one latent position.

- `vgg16`: torchvision's VGG16 convolutions up to relu4_3 (stride 8, 512 features), the same
  weights as LPIPS (offline in ../shared/weights; resolved like LPIPS's). For tests and as a
  small teacher.
- `dinov2_vits14`, `_vitb14`, `_vitl14`, `_vitg14`: DINOv2 (stride 14; 384 / 768 / 1024 / 1536
  features) through timm's ViT (`pip install timm`), from a local file: torch hub's
  `dinov2_vits14_pretrain.pth` (read with torch's restricted loader), timm's `model.safetensors`
  (a file, or a folder from the Hub's `timm/vit_small_patch14_dinov2.lvd142m`), found at
  `loss.alignment.teacher_path`, else in run.weights_dir / $VAE_SCALE_WEIGHTS / torch's cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vae_scale.errors import ConfigError
from vae_scale.perception.lpips import vgg16_features
from vae_scale.perception.weights import (
    VGG16,
    PretrainedFile,
    find_weights,
    load_pretrained,
    load_state,
    missing_message,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RELU4_3 = 22  # VGG16 `features` index: stride 8, 512 channels


@dataclass(frozen=True)
class TeacherSpec:
    dim: int  # features per patch
    stride: int  # pixels per patch side
    timm_name: str | None = None  # DINOv2: timm's architecture
    hub_file: str | None = None  # torch hub's weights file name


TEACHERS = {
    "vgg16": TeacherSpec(512, 8),
    "dinov2_vits14": TeacherSpec(384, 14, "vit_small_patch14_dinov2", "dinov2_vits14_pretrain.pth"),
    "dinov2_vitb14": TeacherSpec(768, 14, "vit_base_patch14_dinov2", "dinov2_vitb14_pretrain.pth"),
    "dinov2_vitl14": TeacherSpec(
        1024, 14, "vit_large_patch14_dinov2", "dinov2_vitl14_pretrain.pth"
    ),
    "dinov2_vitg14": TeacherSpec(
        1536, 14, "vit_giant_patch14_dinov2", "dinov2_vitg14_pretrain.pth"
    ),
}


class Teacher(nn.Module):
    """A frozen feature network: `forward(images, grid)` -> (B, dim, *grid) float32."""

    def __init__(self, name: str, network: nn.Module):
        super().__init__()
        spec = TEACHERS[name]
        self.name, self.dim, self.stride = name, spec.dim, spec.stride
        self.network = network
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Teacher:  # frozen: dropout and the like stay off
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor, grid: tuple[int, int]) -> Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        size = (grid[0] * self.stride, grid[1] * self.stride)
        x = F.interpolate(images.float(), size=size, mode="bilinear", antialias=True)
        x = (x - self.mean) / self.std
        if TEACHERS[self.name].timm_name is None:
            return self.network(x).float()
        tokens = self.network.forward_features(x)[:, self.network.num_prefix_tokens :]
        return tokens.transpose(1, 2).reshape(len(x), self.dim, *grid).float()


def load_teacher(name: str, path: str | None, weights_dir: str | None) -> Teacher:
    """Teacher `name` with its real weights; ConfigError (one line) when they are missing."""
    spec = TEACHERS[name]
    if spec.timm_name is None:
        features = vgg16_features()[: RELU4_3 + 1]
        state = load_pretrained(VGG16, weights_dir) if path is None else _read(Path(path))
        convs = {k.removeprefix("features."): v for k, v in state.items()}
        features.load_state_dict(
            {k: v for k, v in convs.items() if int(k.split(".")[0]) <= RELU4_3}
        )
        return Teacher(name, features)
    try:
        import timm
        from timm.models.vision_transformer import checkpoint_filter_fn
    except ImportError:
        raise ConfigError(
            f"loss.alignment.teacher {name}: DINOv2 runs through timm; pip install timm"
        ) from None
    file = _find(name, spec, path, weights_dir)
    network = timm.create_model(
        spec.timm_name, pretrained=False, num_classes=0, dynamic_img_size=True, img_size=518
    )
    state = _read(file)
    if "patch_embed.proj.weight" in state and "mask_token" in state:  # torch hub's layout
        state = checkpoint_filter_fn(state, network)
    try:
        missing, unexpected = network.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a tensor of another shape: the first one named
        lines = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
        missing, unexpected = [lines[0] if lines else str(err).splitlines()[0]], []
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise ConfigError(
            f"loss.alignment.teacher_path: {file} is not {name}'s weights (tensor {first!r} "
            f"{'missing or of another shape' if missing else 'unexpected'})"
        )
    return Teacher(name, network)


def _find(name: str, spec: TeacherSpec, path: str | None, weights_dir: str | None) -> Path:
    if path is not None:
        found = Path(path).expanduser()
        if found.is_dir():
            found = found / "model.safetensors"
        if not found.is_file():
            raise ConfigError(f"loss.alignment.teacher_path: {found} does not exist")
        return found
    wanted = PretrainedFile(f"{name} weights (DINOv2, torch hub's file)", (spec.hub_file,))
    found = find_weights(wanted, weights_dir)
    if found is None:
        raise ConfigError(
            f"loss.alignment.teacher: {missing_message(wanted, weights_dir)}, or set "
            f"loss.alignment.teacher_path to it (or to timm's model.safetensors)"
        )
    return found


def _read(file: Path) -> dict[str, Tensor]:
    try:
        return load_state(file)
    except Exception as err:  # a damaged or foreign file: name it
        raise ConfigError(f"loss.alignment.teacher_path: cannot read {file} ({err})") from None
