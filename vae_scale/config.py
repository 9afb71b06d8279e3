"""Experiment configuration: pydantic models loaded from YAML, validated on load.

A config file has the sections `run`, `data`, `model`, `loss`, `train`, `eval`, `wandb`.
Every key is checked before any work starts: an unknown key, a wrong type, a non-finite number
or an impossible value raises `ConfigError` naming the key (e.g. ``train.lr``) and what was
expected. The `model` section is a discriminated union on `model.name` of the sections the
model families register (each is defined beside its network, vae_scale/models/<family>.py).
Overrides on the command line use dotted keys of any depth:
``train.lr=3e-4 loss.encoder_aug.weight=1``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from vae_scale.data.config import DataConfig
from vae_scale.errors import ConfigError
from vae_scale.losses import LIKELIHOODS
from vae_scale.models import FAMILIES
from vae_scale.objectives import OBJECTIVES
from vae_scale.objectives.alignment import AlignmentConfig
from vae_scale.objectives.discriminator import DiscriminatorConfig
from vae_scale.objectives.encoder_aug import EncoderAugConfig
from vae_scale.objectives.equivariance import EquivarianceConfig
from vae_scale.objectives.flow_matching import ProbeConfig
from vae_scale.objectives.perceptual import PerceptualConfig
from vae_scale.objectives.reconstruction import PixelLossConfig
from vae_scale.schema import (  # noqa: F401  (re-exported for the sections' users)
    Activation,
    Betas,
    FieldError,
    NonNegative,
    NonNegativeFloat,
    Positive,
    Section,
)

# ---------------------------------------------------------------------------- sections


class RunConfig(Section):
    name: str = "run"
    dir: str = "runs"  # run folder = <dir>/<name>
    seed: int = 0
    # Pretrained networks of losses and metrics (VGG16 + LPIPS heads, InceptionV3 for rFID):
    # a folder holding their files; null: $VAE_SCALE_WEIGHTS, then torch's cache
    # ($TORCH_HOME/hub/checkpoints), then their packages' downloads.
    weights_dir: str | None = None

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if not name or "/" in name or name in (".", ".."):
            raise ValueError("expected a plain folder name (no '/')")
        return name


class LossConfig(Section):
    # elbo: the negative ELBO of `likelihood` (likelihood VAEs); autoencoder: the KL
    # autoencoder of latent diffusion (pixel + perceptual + beta x KL + discriminator terms,
    # vae_scale/objectives/autoencoder.py), with loss.likelihood: gaussian for its bits/dim.
    objective: Literal[tuple(OBJECTIVES)] = "elbo"  # type: ignore[valid-type]
    likelihood: Literal[tuple(LIKELIHOODS)] = "bernoulli"  # type: ignore[valid-type]
    beta: NonNegativeFloat = 1.0  # final KL weight (autoencoders: ~1e-6 on per-image sums)
    kl_warmup_steps: NonNegative = 0  # linear warm-up of the KL weight from beta_start to beta
    beta_start: NonNegativeFloat = 0.0
    free_bits: NonNegativeFloat = 0.0  # nats per latent dimension (0 = off)
    # Posterior draws per image in the training loss, averaged: the same ELBO, a gradient with
    # less reparameterization noise, for one more decoder pass per draw (the encoder runs once).
    z_samples: Positive = 1
    encoder_aug: EncoderAugConfig = Field(default_factory=EncoderAugConfig)
    # the autoencoder objective's terms, each its own section (vae_scale/objectives/)
    pixel: PixelLossConfig = Field(default_factory=PixelLossConfig)
    perceptual: PerceptualConfig = Field(default_factory=PerceptualConfig)
    discriminator: DiscriminatorConfig = Field(default_factory=DiscriminatorConfig)
    equivariance: EquivarianceConfig = Field(default_factory=EquivarianceConfig)
    alignment: AlignmentConfig = Field(default_factory=AlignmentConfig)
    # the diffusion probe's settings (loss.objective: flow_matching)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)


class TrainConfig(Section):
    epochs: Positive = 20
    lr: Annotated[float, Field(gt=0)] = 1e-3
    weight_decay: NonNegativeFloat = 0.0  # decoupled (AdamW), as VDVAE's 0.01
    betas: Betas = (0.9, 0.999)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: NonNegative = 0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    grad_accum_batches: Positive = 1  # batches per optimizer step (gradient accumulation)
    grad_clip: NonNegativeFloat = 0.0  # max gradient norm (0 = off)
    max_bad_steps: Positive = 20  # stop after this many consecutive non-finite steps
    # Skip updates whose gradient norm exceeds this (0 = off; VDVAE's spike guard). After
    # max_consecutive_skips skips in a row the next update is applied, clipped, with a warning,
    # so a threshold below the typical norm can never stall training.
    skip_threshold: NonNegativeFloat = 0.0
    max_consecutive_skips: NonNegative = 10
    # Exponential moving average of the weights, used for evaluation, pictures and `vae-scale
    # eval`/`sample` (0 = off). The decay warms up as min(ema_decay, (1 + n) / (10 + n)).
    ema_decay: Annotated[float, Field(ge=0, lt=1)] = 0.0
    compile: bool = False
    # torch.compile's mode when train.compile is on (max-autotune-no-cudagraphs: autotuned
    # kernels; reduce-overhead: CUDA graphs)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = "default"
    # Fused AdamW (one kernel; the update policy then decides on the device, no host sync).
    # null: fused on CUDA, not on the CPU.
    fused_adamw: bool | None = None
    channels_last: bool = False
    cpu: bool = False  # force CPU even when a GPU is present
    log_every_steps: Positive = 10
    # The epoch's progress: a live bar on a terminal; where output goes to a file (Slurm, CI,
    # nohup) or under Slurm, a plain line every log_every_steps steps and 30 s at the least
    # (auto); or always 'bar', 'lines', or 'off'.
    progress: Literal["auto", "bar", "lines", "off"] = "auto"
    checkpoint_every_steps: NonNegative = 0  # 0 = only at epoch ends
    keep_checkpoints: Positive = 2
    # Finish each checkpoint (fsync, sha256 manifest, rename, pruning) on a background
    # thread: training blocks only while the files are written (benchmarks/RESULTS.md).
    checkpoint_async: bool = False
    # Several processes: a collective that waits longer than this for a blocked process
    # (a hung file read) ends the job (exit 3, requeue) instead of hanging it ...
    ddp_timeout_s: Annotated[float, Field(gt=0)] = 1800.0
    # Joining the process group at start: processes that cannot connect to each other within
    # this long (a peer that never came, a restart that lost the race for its addresses) end
    # with exit 3, which torchrun and Slurm retry, instead of waiting train.ddp_timeout_s.
    connect_timeout_s: Annotated[float, Field(gt=0)] = 300.0
    # ... and a process not heard from this long (frozen: stopped, a hung node) ends it sooner
    # (training/watchdog.py).
    heartbeat_timeout_s: Annotated[float, Field(gt=0)] = 120.0
    # Every rank writes the keys of each batch it trains to sample_keys/rank<R>.jsonl (an
    # audit of which samples an epoch trained, across preemptions and topology changes).
    log_sample_keys: bool = False
    # decoder: the encoder is frozen (fine-tuning a decoder on fixed latents, as SD's ft-MSE
    # / ft-EMA decoders were); all: every weight trains.
    trainable: Literal["all", "decoder"] = "all"
    # parameter-name patterns (fnmatch: `net.encoder.*`, `*.norm*`) frozen on top of it
    freeze: list[str] = Field(default_factory=list)

    @field_validator("mixed_precision", "progress", mode="before")
    @classmethod
    def _unquoted_no_or_off(cls, value: Any, info: ValidationInfo) -> Any:
        # YAML 1.1 reads an unquoted `no` or `off` as false: the choice that means "none"
        if value is False:
            return {"mixed_precision": "no", "progress": "off"}[info.field_name]
        return value


class EvalConfig(Section):
    every_epochs: Positive = 1
    # Pictures at these epochs, and always after the last epoch.
    picture_epochs: list[Positive] = Field(default_factory=lambda: [1, 20])
    recon_rows: Positive = 8  # originals | reconstructions, one image pair per row
    num_samples: Positive = 64
    # > 0: at the picture epochs, the test neg. ELBO also with each image's posterior refined
    # by this many Adam steps (test/neg_elbo_refined), and the gap this closes
    # (test/amortization_gap): how much of the test loss is the encoder, not the decoder.
    refine_steps: NonNegative = 0
    # Perceptual reconstruction metrics (vae_scale/perception/networks.py): auto = LPIPS for
    # RGB images and rFID (final epoch, `vae-scale eval`) when their weights are on this
    # machine; on = required; off.
    lpips: Literal["auto", "on", "off"] = "auto"
    # After the last epoch, spatial latents' per-channel mean/std and diffusers'
    # scaling_factor/shift_factor, from this many training images (0 = off):
    # RUN/latent_stats.json, written into `vae-scale export`.
    latent_stats_samples: NonNegative = 4096
    rfid: Literal["auto", "on", "off"] = "auto"
    # Diffusability of spatial latents (analysis/diffusability.py), after the last epoch and in
    # `vae-scale eval`: iFID (with rFID's network: when rFID runs), the latents' spectrum,
    # scale equivariance, per-channel statistics; on the first `diffusability_samples` images,
    # iFID's interpolants towards one of `ifid_neighbours` nearest neighbours. off: none.
    diffusability: Literal["auto", "off"] = "auto"
    diffusability_samples: Positive = 1000
    ifid_neighbours: Positive = 10

    @field_validator("lpips", "rfid", "diffusability", mode="before")
    @classmethod
    def _unquoted_on_off(cls, value: Any) -> Any:
        # YAML 1.1 reads unquoted on/off as true/false
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class WandbConfig(Section):
    # auto: online when an API key and the network are there, else offline (never hangs).
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "vae_scale"
    entity: str | None = None
    group: str | None = None  # load_config's default: the config file's stem (frey_conv)
    job_type: str | None = "train"
    notes: str | None = None
    tags: list[str] = Field(default_factory=list)


# ---------------------------------------------------------------------------- model families

#: model.name -> the family's config section, as the families register them (vae_scale/models)
MODEL_SECTIONS: dict[str, type[Section]] = {
    name: family.config_section for name, family in sorted(FAMILIES.items())
}
MODEL_NAMES = tuple(MODEL_SECTIONS)
ModelConfig = Annotated[
    Union[tuple(MODEL_SECTIONS.values())],  # noqa: UP007
    Field(discriminator="name"),
]


class Config(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig  # the union of the families' sections, discriminated by model.name
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)

    @model_validator(mode="after")
    def _binarized_needs_bernoulli(self) -> Config:
        if self.data.binarize == "dynamic" and self.loss.likelihood != "bernoulli":
            raise FieldError(
                "loss.likelihood", "expected 'bernoulli' when data.binarize is 'dynamic'"
            )
        return self

    @model_validator(mode="after")
    def _what_the_objective_can_do(self) -> Config:
        objective = OBJECTIVES[self.loss.objective]
        if FAMILIES[self.model.name].kind != objective.model_kind:
            names = sorted(n for n, f in FAMILIES.items() if f.kind == objective.model_kind)
            raise FieldError(
                "model.name",
                f"expected one of {names} with loss.objective {self.loss.objective!r}",
            )
        objective.check_config(self)
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) / self.run.name

    @property
    def shard_dir(self) -> str:
        """Where this config's dataset is: <data.shards_dir>/<data.dataset> (folder or URL)."""
        return self.data.location

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


SECTIONS = tuple(name for name in Config.model_fields if name != "model")


# ---------------------------------------------------------------------------- errors


def _key(loc: tuple[Any, ...]) -> str:
    """('model', 'widths', 1) -> 'model.widths[1]'."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


def _section_class(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The section model at `loc`, a path of field names from the top ('loss', 'encoder_aug')."""
    cls: type[BaseModel] = Config
    for part in loc:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        cls = annotation
    return cls


def _message(error: dict[str, Any]) -> str:
    loc = tuple(error["loc"])
    # A discriminated union puts the family's tag into the location: model.conv.latent_dim.
    family = loc[1] if len(loc) > 1 and loc[0] == "model" and loc[1] in MODEL_SECTIONS else None
    if family is not None:
        loc = loc[:1] + loc[2:]
    kind, got = error["type"], error.get("input")
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):
        return f"{_key((*loc, cause.field))}: {cause.message}"
    if kind == "union_tag_not_found":
        return f"model.name: required; one of {list(MODEL_NAMES)}"
    if kind == "union_tag_invalid":
        return f"model.name: expected one of {list(MODEL_NAMES)}, got {error['ctx']['tag']!r}"
    if kind == "extra_forbidden":
        parent = MODEL_SECTIONS[family] if family else _section_class(loc[:-1])
        allowed = sorted(parent.model_fields) if parent is not None else []
        if len(loc) == 1:
            return f"{loc[0]}: unknown section; allowed sections: {allowed}"
        return f"{_key(loc)}: unknown key; allowed keys in '{_key(loc[:-1])}': {allowed}"
    if kind == "literal_error":
        return f"{_key(loc)}: expected one of {error['ctx']['expected']}, got {got!r}"
    if kind == "missing":
        return f"{_key(loc)}: required"
    text = error["msg"].removeprefix("Value error, ")
    text = text.replace("Input should be", "expected")
    return f"{_key(loc)}: {text}, got {got!r}"


# ---------------------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=3e-4' -> (['train', 'lr'], 0.0003); values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.lr=3e-4")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override {text!r}: expected SECTION.KEY=VALUE, e.g. train.lr=3e-4")
    value = yaml.safe_load(raw) if raw.strip() else ""
    # YAML 1.1 reads '3e-4' as a string; accept the float spelling users type.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            pass
    return parts, value


def apply_override(raw: dict[str, Any], text: str) -> None:
    """Set the dotted key of `text` in the nested dict `raw`, creating sections on the way."""
    parts, value = parse_override(text)
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: depth + 1])}: expected a mapping of keys")
        node = child
    node[parts[-1]] = value


#: keys renamed since runs were recorded with them: old -> new (read under the new name)
RENAMED = {
    "loss.adversarial": "loss.discriminator",
    "data.crop": "data.random_crop",
    "train.grad_accum_steps": "train.grad_accum_batches",
}


def rename_old_keys(raw: dict[str, Any]) -> list[str]:
    """Move keys of RENAMED to their new names in the nested dict `raw` (in place); returns
    'old -> new' for each one moved."""
    moved = []
    for old, new in RENAMED.items():
        (section, key), (_, new_key) = old.split("."), new.split(".")
        values = raw.get(section)
        if isinstance(values, dict) and key in values:
            if new_key in values:
                raise ConfigError(f"{old}: renamed to {new}; give only {new}")
            values[new_key] = values.pop(key)
            moved.append(f"{old} -> {new}")
    return moved


def config_from_dict(
    raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = (), note_renamed: bool = False
) -> Config:
    """A validated Config from nested sections and dotted overrides; keys renamed since (a
    run's older config.json) are read under their new names, said when `note_renamed`."""
    raw = _copy_sections(raw or {})
    for text in overrides:
        apply_override(raw, text)
    moved = rename_old_keys(raw)
    if moved and note_renamed:
        print(f"note: renamed config keys, read under their new names: {', '.join(moved)}")
    if not isinstance(raw.get("model"), dict):
        raise ConfigError(f"model.name: required; one of {list(MODEL_NAMES)}")
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_message(err.errors()[0])) from None


def _copy_sections(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: (_copy_sections(v) if isinstance(v, dict) else v) for k, v in raw.items()}


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
    raw = raw or {}
    if isinstance(raw.setdefault("wandb", {}), dict):  # runs of one config file: one group
        raw["wandb"].setdefault("group", path.stem)
    try:
        return config_from_dict(raw, overrides, note_renamed=True)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
