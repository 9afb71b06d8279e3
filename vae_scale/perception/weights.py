"""Where the pretrained networks of perceptual losses and metrics come from, offline first.

Each network's weights are looked for, in order:
1. `run.weights_dir` (a config key), else `$VAE_SCALE_WEIGHTS`: a folder holding the file;
2. torch's cache, `$TORCH_HOME/hub/checkpoints/` (where torchvision puts its downloads);
3. where the network's own package keeps them (torchvision's download, the `lpips` package's
   files), when that is installed and, for downloads, online.
Missing everywhere, the error is one line naming the file and the folders to put it in.
Loading never unpickles objects: safetensors, or `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from vae_scale.errors import ConfigError

WEIGHTS_ENV = "VAE_SCALE_WEIGHTS"
# the longest wait for the next byte of a download (torch.hub has no timeout of its own: a
# stalled server or proxy would hang a run's start for ever)
DOWNLOAD_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class PretrainedFile:
    """One network's weights: the file names it may have (ours first) and what it is."""

    what: str  # "VGG16 (ImageNet) convolutions for LPIPS"
    names: tuple[str, ...]  # accepted file names, in order of preference
    url: str | None = None  # torch.hub download (torchvision's), tried last


VGG16 = PretrainedFile(
    "VGG16 (ImageNet) convolutions for LPIPS",
    ("vgg16_features.safetensors", "vgg16-397923af.pth"),
    "https://download.pytorch.org/models/vgg16-397923af.pth",
)
LPIPS_VGG_HEADS = PretrainedFile(
    "LPIPS v0.1 linear heads for VGG", ("lpips_vgg_heads.safetensors", "vgg.pth")
)
# pytorch-fid's InceptionV3 (the TF FID graph's weights): the protocol rFID is reported under
FID_INCEPTION = PretrainedFile(
    "InceptionV3 FID weights (pytorch-fid)",
    ("pt_inception-2015-12-05.safetensors", "pt_inception-2015-12-05-6726825d.pth"),
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth",
)


def torch_cache() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def search_folders(weights_dir: str | None) -> list[Path]:
    configured = weights_dir or os.environ.get(WEIGHTS_ENV)
    return [*([Path(configured).expanduser()] if configured else []), torch_cache()]


def find_weights(spec: PretrainedFile, weights_dir: str | None) -> Path | None:
    """The first file of `spec` in the search folders, or None."""
    for folder in search_folders(weights_dir):
        for name in spec.names:
            if (folder / name).is_file():
                return folder / name
    return None


def missing_message(spec: PretrainedFile, weights_dir: str | None) -> str:
    folders = " or ".join(str(f) for f in search_folders(weights_dir))
    other = f" (or {', '.join(spec.names[1:])})" if len(spec.names) > 1 else ""
    return (
        f"{spec.what} not found: put {spec.names[0]}{other} in {folders} (set "
        f"run.weights_dir or ${WEIGHTS_ENV} to a folder holding it)"
    )


def load_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def load_pretrained(spec: PretrainedFile, weights_dir: str | None) -> dict[str, torch.Tensor]:
    """`spec`'s state dict from the first place that has it (module docstring); a download
    only as the last resort. ConfigError (one line) when it is nowhere."""
    path = find_weights(spec, weights_dir)
    if path is not None:
        return load_state(path)
    if spec is LPIPS_VGG_HEADS:
        packaged = _lpips_package_heads()
        if packaged is not None:
            return load_state(packaged)
    if spec.url:
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # urllib's sockets, under torch.hub
        try:
            return torch.hub.load_state_dict_from_url(spec.url, progress=False, map_location="cpu")
        except Exception as err:  # offline, proxy, DNS, a stall: the same message to a user
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(
                f"{missing_message(spec, weights_dir)}; downloading it failed ({reason})"
            ) from None
        finally:
            socket.setdefaulttimeout(previous)
    raise ConfigError(missing_message(spec, weights_dir))


def _lpips_package_heads() -> Path | None:
    try:
        import lpips  # the reference implementation ships its heads
    except ImportError:
        return None
    path = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"
    return path if path.is_file() else None
