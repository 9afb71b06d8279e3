"""The `data` config section: where a dataset's shards are and how they are read. It lives
with the data code that reads it (the rest of the config only holds it)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from vae_scale.data.streaming.remote import join
from vae_scale.schema import NonNegative, NonNegativeFloat, Positive, Section


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
    # Train on random_crop x random_crop windows of the stored images: a fresh random window
    # per sample and epoch (seeded by run.seed, epoch and sample key, so resume and elastic
    # re-plans stay exact); evaluation, pictures and exports use the centre window. null: whole
    # images. (`vae-scale shard --crop` is another operation: a centre crop before resizing.)
    random_crop: Annotated[int, Field(ge=1)] | None = None
    image_key: str = "npy;png;jpg;jpeg;webp"
    label_key: str | None = "cls"
    batch_size: Positive = 100  # images per batch, per process
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

    @property
    def location(self) -> str:
        """Where this config's dataset is: <shards_dir>/<dataset> (a folder or a URL)."""
        return join(self.shards_dir, self.dataset)
