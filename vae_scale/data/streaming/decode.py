"""Tar members of one sample -> {"key", "image" (CHW: uint8 pixels, or float16 latents of
latent shards), "cls"?, "json"?}.

Only npy, images, json and cls are decoded; pickle members are refused, never unpickled.
Errors name the shard and the sample key.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vae_scale.errors import DataError

PICKLE_SUFFIXES = {"pyd", "pickle", "pkl", "pth", "pt"}
IMAGE_SUFFIXES = ("npy", "png", "jpg", "jpeg", "webp")


@dataclass(frozen=True)
class DecodeSpec:
    """How samples of a split become tensors: the expected (H, W, C), or, with `resize`, the
    size every image is resized (shorter side) and centre-cropped to; which members hold the
    image (first present wins) and the label ('cls', 'json.<field>' or None); `labels`:
    whether labels and JSON are decoded at all (training reads images only)."""

    image_hwc: tuple[int, int, int]
    resize: bool = False
    image_keys: tuple[str, ...] = IMAGE_SUFFIXES
    label_key: str | None = "cls"
    labels: bool = True
    dtype: str = "uint8"  # what the npy arrays hold (index.json's encoding)


def where(sample: dict[str, Any]) -> str:
    """ "shard NAME, sample KEY" for error messages."""
    return f"shard {Path(str(sample.get('__url__', '?'))).name}, sample {sample.get('__key__')}"


_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}


def load_npy(data: bytes) -> np.ndarray:
    """`np.load(..., allow_pickle=False)` with the header parsed once per distinct header: every
    image of a dataset has the same one, and parsing it (`ast.literal_eval`) is a large part
    of reading a small image (benchmarks/RESULTS.md)."""
    if data[:8] == b"\x93NUMPY\x01\x00":  # format 1.0: 2-byte little-endian header length
        end = 10 + int.from_bytes(data[8:10], "little")
        cached = _NPY_HEADERS.get(data[:end])
        if cached is not None:
            dtype, shape, nbytes = cached
            if len(data) - end != nbytes:
                raise ValueError(
                    f"npy payload of {len(data) - end} bytes, expected {shape} {dtype}"
                )
            return np.frombuffer(data, dtype=dtype, offset=end).reshape(shape)
        array = np.load(io.BytesIO(data), allow_pickle=False)
        if array.flags.c_contiguous and not array.dtype.hasobject:
            _NPY_HEADERS[data[:end]] = (array.dtype, array.shape, array.nbytes)
        return array
    return np.load(io.BytesIO(data), allow_pickle=False)


def read_image(data: bytes, suffix: str, spec: DecodeSpec) -> np.ndarray:
    """One image member's bytes -> its HWC (or HW) array, resized when the spec says."""
    if suffix == "npy":
        return load_npy(data)
    from PIL import Image

    h, w, c = spec.image_hwc
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("L" if c == 1 else "RGB")
        if spec.resize and im.size != (w, h):
            scale = max(w / im.width, h / im.height)  # shorter side to size, then centre crop
            size = (max(w, round(im.width * scale)), max(h, round(im.height * scale)))
            im = im.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
            left, top = (im.width - w) // 2, (im.height - h) // 2
            im = im.crop((left, top, left + w, top + h))
        return np.asarray(im)


def decode_sample(sample: dict[str, Any], spec: DecodeSpec) -> dict[str, Any]:
    bad = PICKLE_SUFFIXES.intersection(sample)
    if bad:
        raise DataError(
            f"{where(sample)}: refusing to decode pickle member(s) {sorted(bad)} (pickle can "
            f"run code; vae_scale reads npy/png/jpg/webp/json/cls only)"
        )
    suffix = next((s for s in spec.image_keys if s in sample), None)
    if suffix is None:
        members = sorted(k for k in sample if not k.startswith("__"))
        raise DataError(
            f"{where(sample)}: no image member (expected one of {list(spec.image_keys)}, "
            f"found {members})"
        )
    try:
        image = read_image(sample[suffix], suffix, spec)
    except Exception as err:
        raise DataError(f"{where(sample)}: unreadable {suffix} ({err})") from err
    if image.ndim == 2:
        image = image[..., None]
    if image.shape != tuple(spec.image_hwc) or image.dtype != np.dtype(spec.dtype):
        source = (
            "from data.image_size and data.channels (npy images are taken as they are; "
            "png/jpg/webp are resized)"
            if spec.resize
            else "as in index.json (or set data.image_size to resize png/jpg/webp on decode)"
        )
        raise DataError(
            f"{where(sample)}: image of shape {image.shape} {image.dtype}, expected "
            f"{tuple(spec.image_hwc)} {spec.dtype} (H, W, C) {source}"
        )
    out: dict[str, Any] = {
        "key": sample.get("__key__"),
        "image": np.ascontiguousarray(image.transpose(2, 0, 1)),
    }
    if not spec.labels:
        return out
    try:
        if "json" in sample:
            out["json"] = json.loads(sample["json"])
        label = label_of(sample, out.get("json"), spec.label_key)
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{where(sample)}: unreadable label {spec.label_key} ({err})") from err
    if label is not None:
        out["cls"] = label
    return out


def label_of(sample: dict[str, Any], meta: Any, key: str | None) -> int | None:
    """The label data.label_key names, from a sample's members or its decoded JSON."""
    if key is None:
        return None
    if key.startswith("json."):
        if not isinstance(meta, dict) or key[5:] not in meta:
            return None
        return int(meta[key[5:]])
    return int(sample[key]) if key in sample else None
