"""CelebA and image folders -> shards with the parallel, resumable writer."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, real_data_root
from vae_scale.cli import main as cli_main
from vae_scale.config import DataConfig
from vae_scale.data.sourcing import celeba, folder, folder_sharder, shards
from vae_scale.data.sourcing.folder_sharder import (
    Preprocess,
    crop_box,
    load_image,
    merge_index,
    parse_crop,
    shard_collection,
)
from vae_scale.data.streaming.loader import ShardSplit
from vae_scale.errors import DataError

NUM_IMAGES = 40  # 32 / 4 / 4 after the seeded split; 4 per shard -> 10 shards
SHARD_SIZE = 4
TRUNCATED = "000007.jpg"
PRE = Preprocess(size=64, crop=celeba.DEFAULT_CROP)


def write_jpeg(path: Path, rng: np.random.Generator, size=(89, 109)) -> None:
    """A smooth random colour image (JPEG-friendly), width x height = size."""
    w, h = size
    low = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
    Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC).save(path, quality=90)


@pytest.fixture(scope="module")
def celeba_source(tmp_path_factory) -> Path:
    """The official CelebA layout with 40 images (no partition file), one truncated JPEG.
    Real faces and attribute rows from ../shared/data when present, else synthetic ones."""
    src = tmp_path_factory.mktemp("celeba_src")
    images = src / "img_align_celeba"
    images.mkdir()
    names = [f"{i:06d}.jpg" for i in range(1, NUM_IMAGES + 1)]
    root = real_data_root()
    real = root / "celeba" if root else None
    if real is not None and (real / celeba.ATTR_FILE).is_file():
        lines = (real / celeba.ATTR_FILE).read_text().splitlines()
        header, rows = lines[1], lines[2 : 2 + NUM_IMAGES]
        for name in names:
            (images / name).write_bytes((real / "img_align_celeba_89x109" / name).read_bytes())
    else:
        rng = np.random.default_rng(0)
        header = " ".join(f"Attr_{i}" for i in range(40))
        rows = [n + " " + " ".join(rng.choice(["-1", " 1"], 40)) for n in names]
        for name in names:
            write_jpeg(images / name, rng)
    (src / celeba.ATTR_FILE).write_text("\n".join([str(NUM_IMAGES), header, *rows]) + "\n")
    data = (images / TRUNCATED).read_bytes()
    (images / TRUNCATED).write_bytes(data[: len(data) * 6 // 10])
    return src


def sharded(source: Path, out: Path, workers: int = 1, **kwargs) -> dict:
    collection = celeba.collect(source, seed=0)
    return shard_collection(collection, out, PRE, SHARD_SIZE, workers=workers, **kwargs)


@pytest.fixture(scope="module")
def reference(celeba_source, tmp_path_factory) -> Path:
    """An uninterrupted one-process run: what every other way of sharding must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "celeba"
    sharded(celeba_source, out)
    return out


def without_time(index: dict) -> dict:
    return {k: v for k, v in index.items() if k != "created"}


def shard_bytes(folder_path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder_path.glob("*.tar"))}


# ---------------------------------------------------------------------------- preprocessing


def test_crop_box_is_relative_and_resize_gives_64x64(celeba_source):
    # 148 of 178 px at full resolution is 74 of 89 px on the half-size images.
    assert crop_box("148/178", 178, 218) == (15, 35, 163, 183)
    assert crop_box("148/178", 89, 109) == (8, 18, 82, 92)  # 7.5, 17.5 rounded as torchvision
    assert crop_box("square", 100, 80) == (10, 0, 90, 80)
    assert crop_box("50", 100, 80) == (25, 15, 75, 65)
    assert crop_box("0.5", 100, 80) == (25, 15, 75, 65)
    with pytest.raises(ValueError, match="does not fit"):
        crop_box("120", 100, 80)
    for bad in ("wide", "0", "3/2", "-5"):
        with pytest.raises(ValueError, match="crop"):
            parse_crop(bad)
    # Exactly the usual CelebA-64 transform: torchvision CenterCrop + Resize (antialiased).
    from torchvision import transforms

    usual = transforms.Compose([transforms.CenterCrop(74), transforms.Resize(64)])
    for name in ("000001.jpg", "000002.jpg"):
        path = celeba_source / "img_align_celeba" / name
        out = load_image(path, PRE)
        assert out.shape == (64, 64, 3) and out.dtype == np.uint8
        with Image.open(path) as im:
            assert np.array_equal(out, np.asarray(usual(im.convert("RGB"))))


def test_crop_keeps_only_the_centre(tmp_path):
    frame = np.zeros((218, 178, 3), np.uint8)
    frame[...] = (0, 0, 255)  # blue border ...
    frame[35:183, 15:163] = (255, 0, 0)  # ... around a red 148 x 148 centre
    Image.fromarray(frame).save(tmp_path / "f.png")
    out = load_image(tmp_path / "f.png", PRE).astype(int)
    assert out.shape == (64, 64, 3)
    assert (out[..., 0] == 255).all() and (out[..., 2] == 0).all()


# ---------------------------------------------------------------------------- celeba


def test_counts_bad_file_reported_and_attributes_round_trip(celeba_source, reference):
    index = shards.load_index(reference)
    assert index["params"]["partition"].startswith("seeded 80%/10%/10%")
    parts = folder.seeded_fraction_split([f"{i:06d}.jpg" for i in range(1, 41)], seed=0)
    assert {k: v["num_samples"] for k, v in index["splits"].items()} == {
        split: len(names) - (TRUNCATED in names) for split, names in parts.items()
    }
    assert index["skipped"]["count"] == 1
    (bad,) = index["skipped"]["files"]
    assert bad["path"] == TRUNCATED and "truncated" in bad["error"]
    assert index["image_shape"] == [3, 64, 64]
    # Attributes: json of every sample equals the row of list_attr_celeba.txt.
    lines = (celeba_source / celeba.ATTR_FILE).read_text().splitlines()
    names = lines[1].split()
    rows = {f.split()[0]: [int(v == "1") for v in f.split()[1:]] for f in lines[2:]}
    assert index["params"]["attributes"] == names
    seen = []
    for split in ("train", "val", "test"):
        for batch in ShardSplit(
            reference, split, DataConfig(batch_size=8, verify_shards=True)
        ).eval_batches():
            assert batch["image"].shape[1:] == (3, 64, 64)
            for key, meta in zip(batch["key"], batch["json"]):
                assert meta["path"] == f"{key}.jpg"
                assert meta["attr_vector"] == rows[meta["path"]]
                assert meta["attrs"] == dict(zip(names, rows[meta["path"]]))
                seen.append(key)
    assert sorted(seen) == sorted(n[:-4] for n in rows if n != TRUNCATED)


def test_partition_rules():
    names = [f"{i:06d}.jpg" for i in range(1, 31)]
    parts, rule = celeba.choose_partition(names, None, seed=0)
    assert rule.startswith("seeded") and "no list_eval_partition.txt" in rule
    assert [len(parts[s]) for s in ("train", "val", "test")] == [24, 3, 3]
    assert sorted(sum(parts.values(), [])) == names
    assert parts == celeba.choose_partition(names, None, seed=0)[0]
    assert parts != celeba.choose_partition(names, None, seed=1)[0]
    # Images in all three official ranges: the ranges decide.
    spread = ["000001.jpg", "162770.jpg", "162771.jpg", "182637.jpg", "182638.jpg", "202599.jpg"]
    parts, rule = celeba.choose_partition(spread, None, seed=0)
    assert rule.startswith("official index ranges")
    assert parts == {
        "train": ["000001.jpg", "162770.jpg"],
        "val": ["162771.jpg", "182637.jpg"],
        "test": ["182638.jpg", "202599.jpg"],
    }
    # The partition file wins over the ranges ...
    given = {n: s for n, s in zip(spread, ["test", "val", "train", "train", "val", "test"])}
    parts, rule = celeba.choose_partition(spread, given, seed=0)
    assert rule == "official list_eval_partition.txt"
    assert parts["train"] == ["162771.jpg", "182637.jpg"]
    # ... unless it leaves a split empty for these images.
    parts, rule = celeba.choose_partition(names, {n: "train" for n in names}, seed=0)
    assert rule.startswith("seeded") and "leaves a split empty" in rule


def test_partition_file_and_torchvision_layout(celeba_source, tmp_path):
    root = tmp_path / "celeba"  # torchvision: ROOT/celeba/...
    root.mkdir()
    (root / "img_align_celeba").symlink_to(celeba_source / "img_align_celeba")
    (root / celeba.ATTR_FILE).write_bytes((celeba_source / celeba.ATTR_FILE).read_bytes())
    codes = [0] * 30 + [1] * 5 + [2] * 5
    (root / celeba.PARTITION_FILE).write_text(
        "".join(f"{i:06d}.jpg {c}\n" for i, c in enumerate(codes, start=1))
    )
    collection = celeba.collect(tmp_path, seed=0)
    assert collection.params == {"partition": "official list_eval_partition.txt"}
    assert [i.key for i in collection.splits["val"]] == [f"{i:06d}" for i in range(31, 36)]
    assert celeba.PARTITION_FILE in collection.source["files"]


def test_missing_celeba_says_where_to_put_it(tmp_path):
    with pytest.raises(DataError) as err:
        celeba.collect(tmp_path / "nowhere", seed=0)
    message = str(err.value)
    assert str(tmp_path / "nowhere") in message and "img_align_celeba" in message
    assert "Google Drive" in message and celeba.ATTR_FILE in message


# ---------------------------------------------------------------------------- resuming


KILLER = """
import os, signal, sys
from vae_scale.data.sourcing import folder_sharder
from vae_scale.cli import main

loads, real_load = [0], folder_sharder.load_image

def load_then_die(path, preprocess):
    loads[0] += 1
    if loads[0] == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)  # a hard kill: no cleanup runs
    return real_load(path, preprocess)

folder_sharder.load_image = load_then_die
main(sys.argv[2:])
"""


@pytest.mark.slow
def test_killed_run_resumes_to_identical_shards_and_index(celeba_source, reference, tmp_path):
    out = tmp_path / "shards"
    args = ["shard", "celeba", "--source", str(celeba_source), "--out", str(out)]
    args += ["--shard-size", str(SHARD_SIZE), "--workers", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # Killed while writing the 3rd shard (image 11 of 4 + 4 + 4).
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, "11", *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr
    partial = out / ".celeba.partial"
    assert not (out / "celeba").exists()  # nothing visible under the final name
    done = sorted(p.name for p in partial.glob("*.tar"))
    assert done == ["train-000000.tar", "train-000001.tar"]
    assert len(list(partial.glob("train-000002.tar.tmp-*"))) == 1  # the half-written shard
    mtimes = {name: (partial / name).stat().st_mtime_ns for name in done}

    assert cli_main([*args[:-2], "--workers", "2"]) == 0  # resume, in parallel
    final = out / "celeba"
    assert without_time(shards.load_index(final)) == without_time(shards.load_index(reference))
    assert shard_bytes(final) == shard_bytes(reference)
    assert {n: (final / n).stat().st_mtime_ns for n in done} == mtimes  # not rewritten
    assert not partial.exists() and not (final / folder_sharder.PARTS_DIR).exists()
    assert not list(final.glob("*.tmp-*"))
    # Up to date: a re-run is a no-op.
    assert cli_main(args) == 0
    assert {n: (final / n).stat().st_mtime_ns for n in done} == mtimes


def test_array_tasks_then_merge_equal_one_run(celeba_source, reference, tmp_path):
    out = tmp_path / "celeba"
    collection = celeba.collect(celeba_source, seed=0)
    for task in (0, 2):
        assert sharded(celeba_source, out, task_index=task, num_tasks=3) is None
    with pytest.raises(DataError, match=r"3 of 10 shards are not complete \(first: train-000001"):
        merge_index(collection, out, PRE, SHARD_SIZE)
    sharded(celeba_source, out, task_index=1, num_tasks=3)
    index = merge_index(collection, out, PRE, SHARD_SIZE)
    assert without_time(index) == without_time(shards.load_index(reference))
    assert shard_bytes(out) == shard_bytes(reference)


# ---------------------------------------------------------------------------- any folder


def test_folder_with_labels_bad_and_non_image_files(tmp_path):
    src = tmp_path / "pets"
    rng = np.random.default_rng(1)
    for cls, count in (("cat", 7), ("dog", 6)):
        (src / cls).mkdir(parents=True)
        for i in range(count):
            write_jpeg(src / cls / f"img.{i}.jpg", rng, size=(120, 90))
    Image.fromarray(np.full((40, 50, 4), 200, np.uint8)).save(src / "dog" / "rgba.png")
    good = 7 + 6 + 1
    data = (src / "cat" / "img.0.jpg").read_bytes()
    (src / "cat" / "img.0.jpg").write_bytes(data[: len(data) // 2])  # truncated
    (src / "dog" / "fake.jpg").write_text("not a JPEG at all")  # non-image with .jpg name
    (src / "dog" / "notes.txt").write_text("labels by folder")  # not an image file
    out = tmp_path / "shards"
    code = cli_main(
        [
            "shard",
            "folder",
            "--source",
            str(src),
            "--out",
            str(out),
            "--name",
            "pets64",
            "--labels-from-subfolders",
            "--shard-size",
            "3",
            "--workers",
            "2",
        ]
    )
    assert code == 0
    index = shards.load_index(out / "pets64")
    skipped = {f["path"]: f["error"] for f in index["skipped"]["files"]}
    assert index["skipped"]["count"] == 2 and set(skipped) == {"cat/img.0.jpg", "dog/fake.jpg"}
    assert "truncated" in skipped["cat/img.0.jpg"]
    assert "UnidentifiedImageError" in skipped["dog/fake.jpg"]
    assert index["ignored"]["files"] == ["dog/notes.txt"]
    assert sum(s["num_samples"] for s in index["splits"].values()) == good - 1
    assert index["params"]["classes"] == ["cat", "dog"]
    labels = {}
    for split in index["splits"]:
        for shard in index["splits"][split]["shards"]:
            with tarfile.open(out / "pets64" / shard["name"]) as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
            for name, payload in members.items():
                if name.endswith(".npy"):
                    assert np.load(io.BytesIO(payload)).shape == (64, 64, 3)
                if name.endswith(".json"):
                    meta = json.loads(payload)
                    labels[meta["path"]] = int(members[name[: -len("json")] + "cls"])
    assert len(labels) == good - 1
    assert all(labels[p] == (0 if p.startswith("cat/") else 1) for p in labels)
    assert "dog/rgba.png" in labels  # RGBA converted, not skipped


def test_image_options_rejected_for_array_datasets(capsys):
    assert cli_main(["shard", "frey", "--size", "32", "--workers", "2"]) == 2
    assert "--size, --workers: only for image datasets" in capsys.readouterr().err


def test_both_writers_use_the_one_index_format():
    from vae_scale.data import index

    for writer in (folder_sharder, shards):
        assert writer.INDEX_NAME is index.INDEX_NAME and writer.SHARD_PATTERN is index.SHARD_PATTERN


def test_chunk_of_only_bad_files_leaves_no_empty_shard(tmp_path):
    from vae_scale.data.sourcing.folder_sharder import ImageCollection, ImageItem

    rng = np.random.default_rng(2)
    for i in range(4):
        write_jpeg(tmp_path / f"good{i}.jpg", rng, size=(32, 32))
    for i in range(2):
        (tmp_path / f"bad{i}.jpg").write_bytes(b"\xff\xd8 not really")
    items = [ImageItem(key=p.stem, path=p.name) for p in sorted(tmp_path.glob("*.jpg"))]
    collection = ImageCollection(
        name="mixed", root=tmp_path, splits={"train": items[:4], "val": items[4:]}, source={}
    )
    out = tmp_path / "out" / "mixed"
    index = shard_collection(collection, out, Preprocess(16, "square"), shard_size=2, workers=1)
    # bad0, bad1 fill train-000000 on their own: no shard file, not in the index.
    assert [s["name"] for s in index["splits"]["train"]["shards"]] == ["train-000001.tar"]
    assert not (out / "train-000000.tar").exists()
    assert index["splits"]["train"] == {
        **index["splits"]["train"],
        "num_samples": 2,
        "num_skipped": 2,
    }
    assert sorted(f["path"] for f in index["skipped"]["files"]) == ["bad0.jpg", "bad1.jpg"]
    assert ShardSplit(out, "train", DataConfig(batch_size=2)).num_samples == 2
