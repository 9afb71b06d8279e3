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

from vae_scale.errors import ConfigError
from vae_scale.losses import LIKELIHOODS
from vae_scale.models import FAMILIES
from vae_scale.objectives.adversarial import AdversarialConfig
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


class DataConfig(Section):
    dataset: str = "frey"
    # Where the dataset's shards and index.json are: <shards_dir>/<dataset>, a local folder or
    # a URL (http(s)://host/path, s3://bucket/path with s3fs, file://...).
    shards_dir: str = "shards"
    # Shards of another tool, per split: a brace pattern of paths or URLs
    # ("https://host/c10/train-{000000..000089}.tar"), several joined by '::', or pipe:
    # commands. index.json is read beside them when it exists (or from data.index_url).
    urls: dict[Literal["train", "val", "test"], str] = Field(default_factory=dict)
    index_url: str | None = None
    # Without an index: samples per training epoch (shards are resampled, open_clip's
    # convention), and decoding: images resized (shorter side) and centre-cropped to
    # image_size, of `channels`, from the first present member of image_key; label from
    # label_key ('cls', 'json.<field>', or null for none).
    samples_per_epoch: Annotated[int, Field(ge=1)] | None = None
    image_size: Annotated[int, Field(ge=1)] | None = None
    channels: Literal[1, 3] = 3
    # Train on crop x crop windows of the stored images: a fresh random window per sample and
    # epoch (seeded by run.seed, epoch and sample key, so resume and elastic re-plans stay
    # exact); evaluation, pictures and exports use the centre window. null: whole images.
    crop: Annotated[int, Field(ge=1)] | None = None
    image_key: str = "npy;png;jpg;jpeg;webp"
    label_key: str | None = "cls"
    batch_size: Positive = 100  # per process
    num_workers: NonNegative = 0  # DataLoader workers per process
    shuffle_buffer: NonNegative = 1000  # samples per shuffled block of each worker's slice
    # True: an epoch leaves out the tail short of a global batch (at most world x batch - 1
    # samples); False: the last global batch is filled by wrapping to the epoch's start.
    drop_last: bool = True
    binarize: Literal["none", "dynamic"] = "none"
    on_error: Literal["raise", "skip"] = "raise"
    verify_shards: bool = True  # sha256 of each shard read whole, against index.json
    # Remote shards: attempts after a transient failure (waiting retry_delay_s, doubling; a
    # 429's Retry-After if longer), the longest wait for the next byte before a read counts as
    # stalled, shards larger than max_shard_mb_in_memory kept in a local file instead of RAM,
    # and an optional local cache of whole shards, least recently used evicted above the bound.
    retries: NonNegative = 3
    retry_delay_s: NonNegativeFloat = 1.0
    read_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    max_shard_mb_in_memory: Annotated[float, Field(gt=0)] = 512.0
    cache_dir: str | None = None
    cache_max_gb: Annotated[float, Field(gt=0)] = 50.0
    # Keep decoded shards in RAM after their first read (for datasets that fit in memory, e.g.
    # Frey, MNIST): later epochs read no files. With num_workers > 0 each process decodes its
    # whole split once at start-up and the forked loader workers share it.
    cache_in_memory: bool = False
    # The shard splits training reads. ["train", "val"] is the final fit on all the labelled
    # training data once settings are chosen (the 60,000 MNIST digits the study trained on);
    # val is then not evaluated. The test split is never trained on.
    train_splits: list[Literal["train", "val"]] = Field(default_factory=lambda: ["train"])

    @field_validator("train_splits")
    @classmethod
    def _distinct(cls, splits: list[str]) -> list[str]:
        if not splits or len(set(splits)) != len(splits):
            raise ValueError(
                'expected a non-empty list of distinct splits from "train", "val" (test is '
                "never trained on)"
            )
        return splits

    @field_validator("image_key")
    @classmethod
    def _image_keys(cls, keys: str) -> str:
        if not all(keys.split(";")):
            raise ValueError("expected member suffixes separated by ';', e.g. 'jpg;png'")
        return keys


class Deformation(Section):
    """Ranges of a random per-image deformation (all zero: the identity).

    Affine: rotation uniform in +-rotate_deg, zoom in 1 +- scale, shear factor in +-shear,
    shift in +-shift_px pixels per axis. Elastic (Simard et al. 2003): a per-pixel displacement
    drawn uniform in [-1, 1], smoothed by a Gaussian of elastic_sigma pixels and scaled by
    elastic_alpha pixels (0 = off). Stroke thickness: each image blended toward its 3x3 grey
    dilation (thicker strokes) or erosion (thinner) by a factor uniform in +-thickness.
    """

    rotate_deg: Annotated[float, Field(ge=0, le=180)] = 0.0
    scale: Annotated[float, Field(ge=0, lt=1)] = 0.0
    shear: NonNegativeFloat = 0.0
    shift_px: NonNegativeFloat = 0.0
    elastic_alpha: NonNegativeFloat = 0.0
    elastic_sigma: Annotated[float, Field(gt=0)] = 4.0
    thickness: Annotated[float, Field(ge=0, le=1)] = 0.0


class EncoderAugConfig(Deformation):
    """Encoder augmentation (vae_scale/training/augment.py): an extra neg. ELBO term, weighted
    by `weight` (0 = off), on `copies` randomly deformed copies of each batch, that trains
    only the encoder; the deformation's ranges are the fields of `Deformation`."""

    weight: NonNegativeFloat = 0.0
    copies: Positive = 1
    rotate_deg: Annotated[float, Field(ge=0, le=180)] = 10.0
    scale: Annotated[float, Field(ge=0, lt=1)] = 0.1
    shear: NonNegativeFloat = 0.1
    shift_px: NonNegativeFloat = 1.0


class LossConfig(Section):
    # elbo: the negative ELBO of `likelihood` (likelihood VAEs); autoencoder: the KL
    # autoencoder of latent diffusion (pixel + perceptual + beta x KL + adversarial terms,
    # vae_scale/objectives/autoencoder.py), with loss.likelihood: gaussian for its bits/dim.
    objective: Literal["elbo", "autoencoder"] = "elbo"
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
    adversarial: AdversarialConfig = Field(default_factory=AdversarialConfig)


class TrainConfig(Section):
    epochs: Positive = 20
    lr: Annotated[float, Field(gt=0)] = 1e-3
    weight_decay: NonNegativeFloat = 0.0  # decoupled (AdamW), as VDVAE's 0.01
    betas: Betas = (0.9, 0.999)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: NonNegative = 0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    grad_accum_steps: Positive = 1
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
    # Several processes: a collective that waits longer than this for a blocked process
    # (a hung file read) ends the job (exit 3, requeue) instead of hanging it ...
    ddp_timeout_s: Annotated[float, Field(gt=0)] = 1800.0
    # ... and a process not heard from this long (frozen: stopped, a hung node) ends it sooner
    # (training/watchdog.py).
    heartbeat_timeout_s: Annotated[float, Field(gt=0)] = 120.0
    # Every rank writes the keys of each batch it trains to sample_keys/rank<R>.jsonl (an
    # audit of which samples an epoch trained, across preemptions and topology changes).
    log_sample_keys: bool = False
    # decoder: the encoder is frozen (fine-tuning a decoder on fixed latents, as SD's ft-MSE
    # / ft-EMA decoders were); all: every weight trains.
    trainable: Literal["all", "decoder"] = "all"

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

    @field_validator("lpips", "rfid", mode="before")
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
    def _autoencoder_objective(self) -> Config:
        if self.loss.objective != "autoencoder":
            return self
        if self.loss.likelihood != "gaussian":
            raise FieldError(
                "loss.likelihood",
                "expected 'gaussian' with loss.objective 'autoencoder' (the decoder predicts "
                "the image; a learned per-pixel scale around it gives its bits/dim)",
            )
        if self.loss.adversarial.weight and self.train.mixed_precision == "fp16":
            raise FieldError(
                "train.mixed_precision",
                "'fp16' with a discriminator (two optimizers under one grad scaler) is not "
                "supported; use 'bf16' (or loss.adversarial.weight=0)",
            )
        unsupported = {"loss.encoder_aug.weight": self.loss.encoder_aug.weight,
                       "loss.z_samples": self.loss.z_samples > 1,
                       "loss.free_bits": self.loss.free_bits}  # fmt: skip
        for key, asked in unsupported.items():
            if asked:
                raise FieldError(
                    key, "an ELBO setting; loss.objective 'autoencoder' has no use for it"
                )
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) / self.run.name

    @property
    def shard_dir(self) -> str:
        """Where this config's dataset is: <data.shards_dir>/<data.dataset> (folder or URL)."""
        from vae_scale.data.streaming.remote import join

        return join(self.data.shards_dir, self.data.dataset)

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


def config_from_dict(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Config:
    raw = _copy_sections(raw or {})
    for text in overrides:
        apply_override(raw, text)
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
        return config_from_dict(raw, overrides)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
