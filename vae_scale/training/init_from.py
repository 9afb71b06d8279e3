"""`model.init_from`: a fresh run starts from the weights of an existing autoencoder (a
fine-tune): a diffusers `AutoencoderKL` folder (what users download from the Hub, loaded by
diffusers itself, safetensors only) or a vae_scale run or export. Every tensor must match the
configured network by name and shape; the first that does not is named. The run records where
its weights came from (config.json's `init_from`, kept by every later start)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from vae_scale.analysis.runs import RECORD_FILE, load_model
from vae_scale.errors import ConfigError

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
# the constructor fields of diffusers' AutoencoderKL that change what the weights compute
# without always changing a tensor's shape
MATCHED_FIELDS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block",
                  "latent_channels", "norm_num_groups", "mid_block_add_attention")  # fmt: skip


def is_diffusers_folder(folder: Path) -> bool:
    config = folder / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("_class_name") == "AutoencoderKL"
    except (OSError, ValueError):
        return False


def initialize(vae: nn.Module, path: str) -> dict[str, Any]:
    """Load `path`'s weights into `vae` (an autoencoder_kl); returns the provenance record."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ConfigError(f"model.init_from: {path} does not exist")
    # a vae_scale export of an autoencoder_kl is a diffusers folder too: its own record (and
    # the likelihood's learned scale) wins
    if is_diffusers_folder(folder) and not (folder / RECORD_FILE).is_file():
        state, kind, extra = _diffusers_weights(vae, folder)
    else:
        source, record = load_model(folder, weights="ema")
        if record.get("model", {}).get("name") != "autoencoder_kl":
            raise ConfigError(
                f"model.init_from: {path} holds a {record.get('model', {}).get('name')!r} "
                f"model; only an autoencoder_kl run, export or diffusers folder can start one"
            )
        state, kind, extra = source.state_dict(), "vae_scale", {}
    load_matching(vae, state, f"model.init_from ({path})")
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return {"path": str(folder.resolve()), "format": kind, "sha256": digest.hexdigest(), **extra}


def load_matching(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict that names the first tensor missing, unexpected or of another shape."""
    own = module.state_dict()
    for name, tensor in own.items():
        if name not in state:
            raise ConfigError(
                f"{source}: has no tensor {name!r} (this model's {tuple(tensor.shape)})"
            )
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ConfigError(
                f"{source}: tensor {name!r} is {tuple(state[name].shape)} there and "
                f"{tuple(tensor.shape)} in this model's config; match model.* to it"
            )
    extra = sorted(set(state) - set(own))
    if extra:
        raise ConfigError(f"{source}: tensor {extra[0]!r} has no place in this model")
    module.load_state_dict(state)


def _diffusers_weights(vae: nn.Module, folder: Path) -> tuple[dict, str, dict]:
    from diffusers import AutoencoderKL

    if not (folder / DIFFUSERS_WEIGHTS).is_file():
        raise ConfigError(
            f"model.init_from: {folder} has no {DIFFUSERS_WEIGHTS} (a pickle-based .bin is never "
            f"loaded: convert it with diffusers' save_pretrained(safe_serialization=True))"
        )
    theirs = json.loads((folder / "config.json").read_text())
    ours = getattr(vae, "diffusers_config", None)
    if ours is None:
        raise ConfigError(
            "model.init_from: a diffusers AutoencoderKL starts model.name autoencoder_kl"
        )
    for field in MATCHED_FIELDS:
        if field in theirs and field in ours and list_or(theirs[field]) != list_or(ours[field]):
            raise ConfigError(
                f"model.init_from: {folder}'s config.json has {field} = {theirs[field]}, this "
                f"model {ours[field]}; match model.* to it"
            )
    own = vae.state_dict()
    # shapes from the file's header (diffusers reads the tensors themselves, below)
    with safe_open(folder / DIFFUSERS_WEIGHTS, "pt") as file:
        shapes = {name: tuple(file.get_slice(name).get_shape()) for name in file.keys()}
    for name, shape in shapes.items():
        mine = own.get(f"net.{name}")
        if mine is not None and tuple(mine.shape) != shape:
            raise ConfigError(
                f"model.init_from: tensor {name!r} of {folder / DIFFUSERS_WEIGHTS} is "
                f"{shape}, {tuple(mine.shape)} in this model's config; match model.* to it"
            )
    # diffusers' own loader: it renames the attention weights of older checkpoints
    try:
        net = AutoencoderKL.from_pretrained(folder, use_safetensors=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"model.init_from: diffusers could not load {folder}: {first}") from None
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    for name, tensor in own.items():  # ours beyond the network: the likelihood's
        if not name.startswith("net."):
            state.setdefault(name, tensor)
    extra = {k: theirs[k] for k in ("scaling_factor", "shift_factor") if theirs.get(k) is not None}
    return state, "diffusers", extra


def list_or(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value
