"""Frey Face: 1,965 grey 28x20 faces in Sam Roweis' `frey_rawface.mat` (variable `ff`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vae_scale.data.sourcing.base import SourceData, seeded_split
from vae_scale.data.sourcing.fetch import download
from vae_scale.errors import DataError
from vae_scale.utils.fsutil import sha256_file
from vae_scale.utils.netutil import is_online

URL = "https://cs.nyu.edu/~roweis/data/frey_rawface.mat"
SHA256 = "265a83a23adb081755cd3de375509828e690324d1d60f076b8ecebc840d59c64"
FILENAME = "frey_rawface.mat"
HEIGHT, WIDTH, COUNT = 28, 20, 1965
SPLIT_SIZES = {"train": 1765, "val": 100, "test": 100}


def locate(source_dir: Path, download_ok: bool = True) -> Path:
    """The .mat file in `source_dir`; downloaded (and checksummed) only when missing."""
    path = source_dir / FILENAME
    if path.is_file():
        return path
    if download_ok and is_online(URL):
        print(f"downloading {URL} -> {path}")
        return download(URL, path, sha256=SHA256)
    raise DataError(
        f"Frey Face file not found: looked for {path} (offline or --no-download, so not "
        f"downloaded). Get it from {URL} (sha256 {SHA256[:12]}…) into {source_dir}, or point "
        f"--data-root / VAE_SCALE_DATA at a folder with freyface/{FILENAME}, or pass --source."
    )


def load_images(path: Path) -> np.ndarray:
    """(1965, 28, 20) uint8 from the .mat file, with clear errors for corrupt or odd files."""
    from scipy.io import loadmat

    try:
        mat = loadmat(path)
    except Exception as err:  # scipy raises several types for corrupt files
        raise DataError(f"{path}: not a readable MATLAB file ({err})") from err
    if "ff" not in mat:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise DataError(f"{path}: variable 'ff' not found (variables: {keys})")
    ff = mat["ff"]
    if ff.shape != (HEIGHT * WIDTH, COUNT) or ff.dtype != np.uint8:
        raise DataError(
            f"{path}: variable 'ff' has shape {ff.shape} dtype {ff.dtype}, expected "
            f"({HEIGHT * WIDTH}, {COUNT}) uint8"
        )
    # Each column is one image stored row-major as 28 rows of 20 pixels.
    return np.ascontiguousarray(ff.T.reshape(COUNT, HEIGHT, WIDTH))


def prepare(source_dir: Path, seed: int, download_ok: bool = True) -> SourceData:
    path = locate(source_dir, download_ok)
    checksum = sha256_file(path)
    if checksum != SHA256:
        print(f"warning: {path} has sha256 {checksum}, not the published {SHA256}")
    images = load_images(path)[..., None]  # HWC, C = 1
    order = seeded_split(COUNT, SPLIT_SIZES, seed)
    splits = {
        name: [{"__key__": f"frey_{i:04d}", "npy": images[i]} for i in idx]
        for name, idx in order.items()
    }
    return SourceData(
        name="frey",
        image_shape=(1, HEIGHT, WIDTH),
        splits=splits,
        source={"files": {FILENAME: checksum}, "url": URL},
        params={"seed": seed, "split_sizes": SPLIT_SIZES},
    )
