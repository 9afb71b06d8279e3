"""Experiment configuration: dataclasses loaded from YAML, validated on load.

A config file has the sections `run`, `data`, `model`, `loss`, `train`, `eval`, `wandb`.
Every key is checked: an unknown key, a wrong type or an impossible value raises
`ConfigError` naming the key (e.g. ``train.lr``) and what was expected, before any work starts.
The `model` section is typed by its `name` (see `vae_scale.models.MODEL_CONFIGS`).
Overrides on the command line use dotted keys: ``train.lr=3e-4 model.latent_dim=8``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


@dataclass
class RunConfig:
    name: str = "run"
    dir: str = "runs"  # run folder = <dir>/<name>
    seed: int = 0

    def validate(self) -> None:
        _check(
            bool(self.name) and "/" not in self.name and self.name not in (".", ".."),
            "run.name",
            "a plain folder name (no '/')",
            self.name,
        )


@dataclass
class DataConfig:
    dataset: str = "frey"
    shards_dir: str = "shards"  # shards are read from <shards_dir>/<dataset>
    batch_size: int = 100  # per process
    num_workers: int = 0  # DataLoader workers per process
    shuffle_buffer: int = 1000  # samples in each worker's shuffle buffer
    binarize: Literal["none", "dynamic"] = "none"
    on_error: Literal["raise", "skip"] = "raise"
    verify_shards: bool = True  # check every shard's sha256 against index.json at start-up
    # Keep decoded shards in RAM after their first read (for datasets that fit in memory, e.g.
    # Frey, MNIST): later epochs read no files. With num_workers > 0 each process decodes its
    # whole split once at start-up and the forked loader workers share it.
    cache_in_memory: bool = False
    # The shard splits training reads. ["train", "val"] is the final fit on all the labelled
    # training data once settings are chosen (the 60,000 MNIST digits the study trained on);
    # val is then not evaluated. The test split is never trained on.
    train_splits: list[str] = field(default_factory=lambda: ["train"])

    def validate(self) -> None:
        _check(
            bool(self.train_splits)
            and set(self.train_splits) <= {"train", "val"}
            and len(set(self.train_splits)) == len(self.train_splits),
            "data.train_splits",
            'a non-empty list of distinct splits from "train", "val" (test is never trained on)',
            self.train_splits,
        )
        _check(self.batch_size >= 1, "data.batch_size", "an integer >= 1", self.batch_size)
        _check(self.num_workers >= 0, "data.num_workers", "an integer >= 0", self.num_workers)
        _check(
            self.shuffle_buffer >= 0, "data.shuffle_buffer", "an integer >= 0", self.shuffle_buffer
        )


@dataclass
class LossConfig:
    likelihood: str = "bernoulli"
    beta: float = 1.0  # final KL weight
    kl_warmup_steps: int = 0  # linear warm-up of the KL weight from beta_start to beta
    beta_start: float = 0.0
    free_bits: float = 0.0  # nats per latent dimension (0 = off)
    # Posterior draws per image in the training loss, averaged: the same ELBO, a gradient with
    # less reparameterization noise, for one more decoder pass per draw (the encoder runs once).
    z_samples: int = 1
    # Encoder augmentation (vae_scale/augment.py): weight of an extra neg. ELBO term on randomly
    # deformed copies of each batch that trains only the encoder (0 = off), and the ranges of
    # the per-image affine map (rotation degrees, zoom 1 +- scale, shear factor, shift pixels),
    # plus an optional elastic distortion (Simard et al. 2003: alpha pixels, smoothed over
    # sigma pixels; alpha 0 = off) and stroke thickness change (+-fraction toward a 3x3
    # dilation/erosion; 0 = off). vae_scale.augment.Deformation documents each. copies: how many
    # independently deformed copies of each image the term averages over per step.
    encoder_aug_weight: float = 0.0
    encoder_aug_copies: int = 1
    encoder_aug_rotate_deg: float = 10.0
    encoder_aug_scale: float = 0.1
    encoder_aug_shear: float = 0.1
    encoder_aug_shift_px: float = 1.0
    encoder_aug_elastic_alpha: float = 0.0
    encoder_aug_elastic_sigma: float = 4.0
    encoder_aug_thickness: float = 0.0

    def validate(self) -> None:
        from vae_scale.losses import LIKELIHOODS

        _check(
            self.likelihood in LIKELIHOODS,
            "loss.likelihood",
            f"one of {sorted(LIKELIHOODS)}",
            self.likelihood,
        )
        _check(self.beta >= 0, "loss.beta", "a number >= 0", self.beta)
        _check(self.beta_start >= 0, "loss.beta_start", "a number >= 0", self.beta_start)
        _check(
            self.kl_warmup_steps >= 0,
            "loss.kl_warmup_steps",
            "an integer >= 0",
            self.kl_warmup_steps,
        )
        _check(self.free_bits >= 0, "loss.free_bits", "a number >= 0", self.free_bits)
        _check(self.z_samples >= 1, "loss.z_samples", "an integer >= 1", self.z_samples)
        _check(
            self.encoder_aug_weight >= 0,
            "loss.encoder_aug_weight",
            "a number >= 0 (0 = off)",
            self.encoder_aug_weight,
        )
        _check(
            self.encoder_aug_copies >= 1,
            "loss.encoder_aug_copies",
            "an integer >= 1",
            self.encoder_aug_copies,
        )
        _check(
            0 <= self.encoder_aug_rotate_deg <= 180,
            "loss.encoder_aug_rotate_deg",
            "degrees in [0, 180]",
            self.encoder_aug_rotate_deg,
        )
        _check(
            0 <= self.encoder_aug_scale < 1,
            "loss.encoder_aug_scale",
            "a number in [0, 1)",
            self.encoder_aug_scale,
        )
        _check(
            self.encoder_aug_shear >= 0,
            "loss.encoder_aug_shear",
            "a number >= 0",
            self.encoder_aug_shear,
        )
        _check(
            self.encoder_aug_shift_px >= 0,
            "loss.encoder_aug_shift_px",
            "pixels >= 0",
            self.encoder_aug_shift_px,
        )
        _check(
            self.encoder_aug_elastic_alpha >= 0,
            "loss.encoder_aug_elastic_alpha",
            "pixels >= 0 (0 = off)",
            self.encoder_aug_elastic_alpha,
        )
        _check(
            self.encoder_aug_elastic_sigma > 0,
            "loss.encoder_aug_elastic_sigma",
            "pixels > 0",
            self.encoder_aug_elastic_sigma,
        )
        _check(
            0 <= self.encoder_aug_thickness <= 1,
            "loss.encoder_aug_thickness",
            "a fraction in [0, 1] (0 = off)",
            self.encoder_aug_thickness,
        )


@dataclass
class TrainConfig:
    epochs: int = 20
    lr: float = 1e-3
    weight_decay: float = 0.0  # decoupled (AdamW), as VDVAE's 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    grad_accum_steps: int = 1
    grad_clip: float = 0.0  # max gradient norm (0 = off)
    max_bad_steps: int = 20  # stop after this many consecutive non-finite steps
    # Skip updates whose gradient norm exceeds this (0 = off; VDVAE's spike guard). After
    # max_consecutive_skips skips in a row the next update is applied, clipped, with a warning,
    # so a threshold below the typical norm can never stall training.
    skip_threshold: float = 0.0
    max_consecutive_skips: int = 10
    # Exponential moving average of the weights, used for evaluation, pictures and `vae-scale
    # eval`/`sample` (0 = off). The decay warms up as min(ema_decay, (1 + n) / (10 + n)).
    ema_decay: float = 0.0
    compile: bool = False
    channels_last: bool = False
    cpu: bool = False  # force CPU even when a GPU is present
    log_every_steps: int = 10
    checkpoint_every_steps: int = 0  # 0 = only at epoch ends
    keep_checkpoints: int = 2

    def validate(self) -> None:
        _check(self.epochs >= 1, "train.epochs", "an integer >= 1", self.epochs)
        _check(self.lr > 0, "train.lr", "a number > 0", self.lr)
        _check(self.weight_decay >= 0, "train.weight_decay", "a number >= 0", self.weight_decay)
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "train.betas",
            "two numbers in [0, 1)",
            self.betas,
        )
        _check(self.warmup_steps >= 0, "train.warmup_steps", "an integer >= 0", self.warmup_steps)
        _check(
            self.grad_accum_steps >= 1,
            "train.grad_accum_steps",
            "an integer >= 1",
            self.grad_accum_steps,
        )
        _check(self.grad_clip >= 0, "train.grad_clip", "a number >= 0", self.grad_clip)
        _check(
            self.max_bad_steps >= 1, "train.max_bad_steps", "an integer >= 1", self.max_bad_steps
        )
        _check(
            self.skip_threshold >= 0,
            "train.skip_threshold",
            "a number >= 0 (0 = off)",
            self.skip_threshold,
        )
        _check(
            self.max_consecutive_skips >= 0,
            "train.max_consecutive_skips",
            "an integer >= 0",
            self.max_consecutive_skips,
        )
        _check(0 <= self.ema_decay < 1, "train.ema_decay", "a number in [0, 1)", self.ema_decay)
        _check(
            self.log_every_steps >= 1,
            "train.log_every_steps",
            "an integer >= 1",
            self.log_every_steps,
        )
        _check(
            self.checkpoint_every_steps >= 0,
            "train.checkpoint_every_steps",
            "an integer >= 0",
            self.checkpoint_every_steps,
        )
        _check(
            self.keep_checkpoints >= 1,
            "train.keep_checkpoints",
            "an integer >= 1",
            self.keep_checkpoints,
        )


@dataclass
class EvalConfig:
    every_epochs: int = 1
    # Pictures at these epochs, and always after the last epoch.
    picture_epochs: list[int] = field(default_factory=lambda: [1, 20])
    recon_rows: int = 8  # originals | reconstructions, one image pair per row
    num_samples: int = 64
    # > 0: at the picture epochs, the test neg. ELBO also with each image's posterior refined
    # by this many Adam steps (test/neg_elbo_refined), and the gap this closes
    # (test/amortization_gap): how much of the test loss is the encoder, not the decoder.
    refine_steps: int = 0

    def validate(self) -> None:
        _check(self.every_epochs >= 1, "eval.every_epochs", "an integer >= 1", self.every_epochs)
        _check(self.refine_steps >= 0, "eval.refine_steps", "an integer >= 0", self.refine_steps)
        _check(
            all(e >= 1 for e in self.picture_epochs),
            "eval.picture_epochs",
            "a list of epoch numbers >= 1",
            self.picture_epochs,
        )
        _check(self.recon_rows >= 1, "eval.recon_rows", "an integer >= 1", self.recon_rows)
        _check(self.num_samples >= 1, "eval.num_samples", "an integer >= 1", self.num_samples)


@dataclass
class WandbConfig:
    # auto: online when an API key and the network are there, else offline (never hangs).
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "vae_scale"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = None  # a model family's config dataclass, chosen by model.name
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) / self.run.name

    @property
    def shard_dir(self) -> Path:
        """Where `vae-scale shard` put this config's dataset."""
        return Path(self.data.shards_dir) / self.data.dataset

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "data": DataConfig,
    "loss": LossConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "wandb": WandbConfig,
}


def _check(ok: bool, key: str, expected: str, got: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {got!r}")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a (simple) type annotation; ints are accepted as floats."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin is Literal:
        if value is False and "no" in args:  # YAML 1.1 reads an unquoted `no` as false
            value = "no"
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_type,) = args or (Any,)
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {annotation!r}")


def build_section(cls: type, values: dict[str, Any] | None, prefix: str) -> Any:
    """Build dataclass `cls` from a dict, rejecting unknown keys and wrong types."""
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(
            f"{prefix}.{unknown[0]}: unknown key; allowed keys in '{prefix}': {sorted(fields)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}") for k, v in values.items()}
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=3e-4' -> (['train', 'lr'], 0.0003); values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.lr=3e-4")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {text!r}: expected SECTION.KEY=VALUE, e.g. train.lr=3e-4")
    value = yaml.safe_load(raw) if raw.strip() else ""
    # YAML 1.1 reads '3e-4' as a string; accept the float spelling users type.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            pass
    return parts, value


def config_from_dict(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Config:
    from vae_scale.models import MODEL_CONFIGS

    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (raw or {}).items()}
    for text in overrides:
        (section, key), value = parse_override(text)
        if section not in SECTIONS and section != "model":
            raise ConfigError(f"override {text!r}: unknown section {section!r}")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{section}: expected a mapping of keys")
        raw[section][key] = value
    allowed = set(SECTIONS) | {"model"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section; allowed sections: {sorted(allowed)}")
    sections = {name: build_section(cls, raw.get(name), name) for name, cls in SECTIONS.items()}
    model_raw = raw.get("model") or {}
    if not isinstance(model_raw, dict) or "name" not in model_raw:
        raise ConfigError(f"model.name: required; one of {sorted(MODEL_CONFIGS)}")
    model_name = model_raw["name"]
    if model_name not in MODEL_CONFIGS:
        raise ConfigError(
            f"model.name: expected one of {sorted(MODEL_CONFIGS)}, got {model_name!r}"
        )
    model = build_section(MODEL_CONFIGS[model_name], model_raw, "model")
    cfg = Config(model=model, **sections)
    validate_cross(cfg)
    return cfg


def validate_cross(cfg: Config) -> None:
    """Checks that involve several sections."""
    if cfg.data.binarize == "dynamic":
        _check(
            cfg.loss.likelihood == "bernoulli",
            "loss.likelihood",
            "'bernoulli' when data.binarize is 'dynamic'",
            cfg.loss.likelihood,
        )


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())  # safe loader: no Python objects from YAML
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return config_from_dict(raw or {}, overrides)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
