"""MNIST: idx reading and shards, the MLP VAE, dynamic binarization, KL warm-up, 2-D pictures,
and a short run on real digits (../shared/data/mnist when present, else tiny idx files)."""

import gzip
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import norm

from conftest import REPO, real_data_root, tiny_config
from vae_scale.analysis import pictures
from vae_scale.config import DataConfig, load_config
from vae_scale.data.sourcing import mnist
from vae_scale.data.sourcing.shards import load_index, write_dataset
from vae_scale.data.streaming.loader import ShardSplit
from vae_scale.errors import ConfigError, DataError
from vae_scale.losses import build_likelihood
from vae_scale.models import build_model
from vae_scale.models.mlp import MLPVAE, MLPVAEConfig

Z2_CONFIG = REPO / "configs" / "mnist_mlp_z2.yaml"
TINY_TRAIN, TINY_TEST, TINY_VAL = 600, 100, 50


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Small MLPs: on a busy 2-core CPU a second torch thread only spins (measured 8x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- tiny idx files


def idx_bytes(array: np.ndarray) -> bytes:
    """The idx format: big-endian magic (0x0801 labels, 0x0803 images), dims, uint8 data."""
    magic = 0x0800 + array.ndim
    header = np.array([magic, *array.shape], dtype=">i4").tobytes()
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def tiny_digits(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Learnable fake digits: one smooth blob pattern per label, random strength, grey edges."""
    yy, xx = np.mgrid[0:28, 0:28]
    centers = np.random.default_rng(123).uniform(6, 22, size=(10, 2, 2))
    protos = np.stack(
        [sum(np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 12.0) for cy, cx in c) for c in centers]
    )
    labels = rng.integers(0, 10, count).astype(np.uint8)
    strength = rng.uniform(0.7, 1.3, size=(count, 1, 1))
    images = np.clip(protos[labels] * strength * 255, 0, 255).astype(np.uint8)
    return images, labels


def write_mnist_files(folder: Path, gz: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    train_x, train_y = tiny_digits(TINY_TRAIN, rng)
    test_x, test_y = tiny_digits(TINY_TEST, rng)
    arrays = {
        "train_images": train_x,
        "train_labels": train_y,
        "test_images": test_x,
        "test_labels": test_y,
    }
    folder.mkdir(parents=True, exist_ok=True)
    for key, array in arrays.items():
        data = idx_bytes(array)
        name = mnist.FILES[key]
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data, compresslevel=1))
        else:
            (folder / name).write_bytes(data)
    return arrays


def tiny_prepare(folder: Path, seed: int = 0):
    return mnist.prepare(folder, seed, download_ok=False, counts=None, val_size=TINY_VAL)


@pytest.fixture(scope="module")
def tiny_mnist(tmp_path_factory):
    """(source folder, arrays, shards folder) of tiny gzipped MNIST-format files."""
    source = tmp_path_factory.mktemp("mnist_src")
    arrays = write_mnist_files(source)
    shards = tmp_path_factory.mktemp("mnist_shards")
    write_dataset(tiny_prepare(source), shards / "mnist", shard_size=64)
    return source, arrays, shards


# ---------------------------------------------------------------------------- data


def test_tiny_shard_counts_and_label_round_trip(tiny_mnist):
    _, arrays, shards = tiny_mnist
    index = load_index(shards / "mnist")
    counts = {k: v["num_samples"] for k, v in index["splits"].items()}
    assert counts == {"train": TINY_TRAIN - TINY_VAL, "val": TINY_VAL, "test": TINY_TEST}
    assert [len(index["splits"][k]["shards"]) for k in ("train", "val", "test")] == [9, 1, 2]
    assert index["image_shape"] == [1, 28, 28]
    seen = {"train": set(), "test": set()}
    for split in ("train", "val", "test"):
        for batch in ShardSplit(
            shards / "mnist", split, DataConfig(batch_size=32, verify_shards=True)
        ).eval_batches():
            for key, image, label in zip(batch["key"], batch["image"], batch["cls"]):
                source, i = key.split("_")
                i = int(i)
                assert np.array_equal(image[0].numpy(), arrays[f"{source}_images"][i])
                assert int(label) == arrays[f"{source}_labels"][i]
                assert i not in seen[source], f"{key} twice"
                seen[source].add(i)
    # val is carved out of train: together they are the whole training file, once each
    assert seen == {"train": set(range(TINY_TRAIN)), "test": set(range(TINY_TEST))}


def test_val_carve_is_seeded(tmp_path, tiny_mnist):
    source = tiny_mnist[0]
    keys = [[s["__key__"] for s in tiny_prepare(source, seed).splits["val"]] for seed in (0, 0, 1)]
    assert keys[0] == keys[1] and keys[0] != keys[2]


def test_torchvision_raw_layout_uncompressed_gives_same_content(tmp_path, tiny_mnist):
    flat = tiny_prepare(tiny_mnist[0])
    write_mnist_files(tmp_path / "MNIST" / "raw", gz=False)  # same seed: same arrays
    raw = tiny_prepare(tmp_path)
    assert raw.source == flat.source  # md5s of the uncompressed content, not of the .gz files
    assert [s["__key__"] for s in raw.splits["val"]] == [s["__key__"] for s in flat.splits["val"]]


def test_official_counts_are_enforced(tiny_mnist):
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: 600 images, expected 60000"):
        mnist.prepare(tiny_mnist[0], seed=0, download_ok=False)


def test_missing_files_offline_name_them(tmp_path):
    write_mnist_files(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"missing t10k-labels-idx1-ubyte\[\.gz\].*not downloaded"):
        tiny_prepare(tmp_path)


def test_missing_files_online_are_fetched_with_torchvision(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    class FakeMNIST:  # what torchvision leaves behind: uncompressed idx files in MNIST/raw
        def __init__(self, root, download=False):
            calls.append((root, download))
            write_mnist_files(Path(root) / "MNIST" / "raw", gz=False)

    monkeypatch.setattr(mnist, "is_online", lambda url: True)
    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    fetch = dict(seed=0, download_ok=True, counts=None, val_size=TINY_VAL)
    data = mnist.prepare(tmp_path, **fetch)
    assert calls == [(str(tmp_path), True)]
    assert len(list(data.splits["test"])) == TINY_TEST
    mnist.prepare(tmp_path, **fetch)  # now found on disk: no second download
    assert len(calls) == 1


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: b"\x00\x00\x08\x01" + d[4:], r"magic number 0x00000801, expected 0x00000803"),
        (lambda d: d[:-100], r"truncated or corrupt"),
        (lambda d: d[:10], r"too short for an idx images header"),
    ],
)
def test_corrupt_idx_header_names_the_file(tmp_path, damage, message):
    write_mnist_files(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataError, match=f"train-images-idx3-ubyte: .*{message}"):
        tiny_prepare(tmp_path)


def test_corrupt_gzip_and_wrong_image_size(tmp_path):
    write_mnist_files(tmp_path)
    gz = tmp_path / "t10k-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:200])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: corrupt gzip"):
        tiny_prepare(tmp_path)
    gz.write_bytes(gzip.compress(idx_bytes(np.zeros((TINY_TEST, 32, 32), np.uint8))))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: images of 32x32, expected"):
        tiny_prepare(tmp_path)


# ---------------------------------------------------------------------------- model, config


def test_mlp_vae_shapes_and_the_study_layers():
    shape = (1, 28, 28)
    model = build_model(MLPVAEConfig(), shape, build_likelihood("bernoulli", shape))
    assert isinstance(model, MLPVAE)
    out = model(torch.rand(5, *shape))
    assert out.x_params.shape == (5, 1, 28, 28)
    assert out.mu.shape == out.logvar.shape == out.z.shape == (5, 2)
    linears = [
        (m.in_features, m.out_features) for m in model.modules() if hasattr(m, "in_features")
    ]
    # 784-512-256, two heads 256->2, then 2-256-512-784
    assert linears == [(784, 512), (512, 256), (256, 2), (256, 2), (2, 256), (256, 512), (512, 784)]
    assert sum(p.numel() for p in model.parameters()) == sum(i * o + o for i, o in linears)
    # any (C, H, W): channels and non-square sizes are flattened in and reshaped out
    odd = build_model(
        MLPVAEConfig(latent_dim=3, hidden=[16]), (3, 8, 6), build_likelihood("bernoulli", (3, 8, 6))
    )
    assert odd(torch.rand(2, 3, 8, 6)).x_params.shape == (2, 3, 8, 6)
    assert odd.sample(4).shape == (4, 3, 8, 6)


def test_mnist_configs_are_the_study_setup():
    cfg = load_config(Z2_CONFIG)
    assert (cfg.data.dataset, cfg.data.batch_size, cfg.data.binarize) == ("mnist", 100, "none")
    assert (cfg.model.name, cfg.model.hidden, cfg.model.latent_dim) == ("mlp", [512, 256], 2)
    assert (cfg.train.lr, cfg.train.epochs, cfg.loss.likelihood) == (1e-3, 100, "bernoulli")
    assert (cfg.loss.kl_warmup_steps, cfg.loss.free_bits) == (0, 0.0)  # plain ELBO
    assert cfg.data.train_splits == ["train", "val"]  # all 60,000 training digits, as the study
    assert load_config(REPO / "configs" / "mnist_mlp_z20.yaml").model.latent_dim == 20
    with pytest.raises(ConfigError, match="model.hidden"):
        load_config(Z2_CONFIG, ["model.hidden=[512, 0]"])


def test_manifold_latents_are_normal_quantiles():
    z = pictures.manifold_latents(20).reshape(20, 20, 2)
    q = norm.ppf(np.linspace(0.05, 0.95, 20))
    assert np.allclose(z[0, :, 0].numpy(), q, atol=1e-6)  # z1 grows to the right
    assert np.allclose(z[:, 0, 1].numpy(), q[::-1], atol=1e-6)  # z2 grows upwards
    assert z[0, 0].tolist() == pytest.approx([norm.ppf(0.05), norm.ppf(0.95)], abs=1e-6)


# ---------------------------------------------------------------------------- training runs


def tiny_run_config(shards: Path, run_dir: Path, *overrides: str):
    return tiny_config(
        "mnist_mlp_z2",
        shards,
        run_dir,
        "eval.picture_epochs=[]",
        "eval.refine_steps=0",  # tested in test_evaluate; here it would only add time
        *overrides,
    )


@pytest.mark.slow
def test_dynamic_binarization_and_kl_warmup_in_a_run(tiny_mnist, tmp_path, monkeypatch):
    import vae_scale.data.streaming.inputs as inputs_module
    import vae_scale.training.loop as train_module

    seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (epoch, grey, binarized)
    epoch = [0]
    original = inputs_module.binarize

    def recording(pixels, mode, generators=None):
        x = original(pixels, mode, generators)
        # training batches (evaluation draws from per-sample generators, pictures use "none")
        if mode == "dynamic" and generators is None:
            seen.append((epoch[0], pixels.clone(), x.clone()))
        return x

    original_batches = ShardSplit.train_batches

    def counting(self, ep, start=0, plan=None):
        epoch[0] = ep
        yield from original_batches(self, ep, start, plan)

    monkeypatch.setattr(inputs_module, "binarize", recording)
    monkeypatch.setattr(ShardSplit, "train_batches", counting)
    warmup, beta0 = 15, 0.2
    cfg = tiny_run_config(
        tiny_mnist[2],
        tmp_path,
        "run.name=binary",
        "data.binarize=dynamic",
        "train.epochs=2",
        "data.batch_size=50",
        "model.hidden=[32]",
        f"loss.kl_warmup_steps={warmup}",
        f"loss.beta_start={beta0}",
        "train.log_every_steps=1",
    )
    run = train_module.train(cfg)

    steps = TINY_TRAIN // 50  # the config trains on train + val: all 600 images, 12 batches
    assert [e for e, _, _ in seen] == [1] * steps + [2] * steps
    grey = torch.cat([g for _, g, _ in seen])
    x = torch.cat([b for _, _, b in seen])
    assert set(x.unique().tolist()) == {0.0, 1.0}
    assert torch.all(x[grey == 0] == 0) and torch.all(x[grey == 1] == 1)
    # E[x] = grey value: compare the mean with 5 standard errors of a Bernoulli mean
    tolerance = 5 * math.sqrt(float((grey * (1 - grey)).sum())) / grey.numel()
    assert abs(float(x.mean() - grey.mean())) < tolerance
    # Every epoch sees all 600 training images (in another order): the same grey image is
    # binarized differently in epoch 2 than in epoch 1.
    by_epoch = {
        e: (
            torch.cat([g for ep, g, _ in seen if ep == e]),
            torch.cat([b for ep, _, b in seen if ep == e]),
        )
        for e in (1, 2)
    }
    (g1, x1), (g2, x2) = by_epoch[1], by_epoch[2]
    matches = [
        (i, j) for i in range(0, len(g1), 7) for j in range(len(g2)) if torch.equal(g1[i], g2[j])
    ]
    assert len(matches) >= 10
    assert all(not torch.equal(x1[i], x2[j]) for i, j in matches)

    # KL warm-up: the weight logged at each optimizer step follows the linear schedule
    rows = [json.loads(r) for r in (run / "steps.jsonl").read_text().splitlines()]
    weights = {r["global_step"]: r["train/kl_weight"] for r in rows}
    assert sorted(weights) == list(range(1, 2 * steps + 1))
    for g, w in weights.items():  # logged after step g, so it was computed at step g - 1
        s = g - 1
        expected = beta0 + (1.0 - beta0) * s / warmup if s < warmup else 1.0
        assert w == pytest.approx(expected), g
    assert weights[1] == pytest.approx(0.2) and weights[warmup + 1] == 1.0


def bernoulli_baseline(train_images: np.ndarray, test_images: np.ndarray) -> float:
    """Test NLL (nats/image) of independent per-pixel Bernoullis with the training means: what a
    VAE that ignores z achieves."""
    p = np.clip(train_images.reshape(len(train_images), -1).mean(0) / 255, 1e-4, 1 - 1e-4)
    x = test_images.reshape(len(test_images), -1) / 255
    return float(-(x * np.log(p) + (1 - x) * np.log(1 - p)).sum(1).mean())


@pytest.fixture(scope="module")
def run_shards(tiny_mnist, tmp_path_factory):
    """(shards folder, stated bound, is_real): 5,000 real training digits (+500 val, 1,000
    test) when ../shared/data/mnist is there, else the tiny files."""
    root = real_data_root()
    if root is None or not (root / "mnist" / "train-images-idx3-ubyte.gz").is_file():
        source, arrays, shards = tiny_mnist
        baseline = bernoulli_baseline(arrays["train_images"], arrays["test_images"])
        return shards, 0.9 * baseline, False
    data = mnist.prepare(root / "mnist", seed=0, download_ok=False)
    assert data.source["files_md5_uncompressed"] == mnist.OFFICIAL_MD5  # the recompressed .gz too
    sizes = {"train": 5000, "val": 500, "test": 1000}
    data.splits = {k: itertools.islice(v, sizes[k]) for k, v in data.splits.items()}
    shards = tmp_path_factory.mktemp("mnist_real")
    write_dataset(data, shards / "mnist", shard_size=500)
    # Measured: 176.4 nats after 3 epochs (z = 2); the independent-pixel baseline is ~206.
    return shards, 185.0, True


@pytest.mark.slow
def test_short_run_learns_and_draws_the_2d_latent(run_shards, tmp_path):
    from vae_scale.training.loop import train

    shards, bound, is_real = run_shards
    epochs = 3 if is_real else 6
    # The study's constant lr: the config's cosine would reach 0 within these ~150 steps.
    cfg = tiny_run_config(
        shards,
        tmp_path,
        "run.name=short",
        f"train.epochs={epochs}",
        "train.lr_schedule=constant",
    )
    run = train(cfg)
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["test/neg_elbo"] < bound, (rows[-1]["test/neg_elbo"], bound)
    assert rows[-1]["test/neg_elbo"] < rows[0]["test/neg_elbo"]
    assert (run / f"samples_epoch{epochs:03d}.png").is_file()
    assert Image.open(run / f"manifold_epoch{epochs:03d}.png").size == (20 * 28, 20 * 28)
    scatter = np.asarray(Image.open(run / f"latent_epoch{epochs:03d}.png").convert("RGB"))
    assert scatter.shape == (560, 640, 3) and len(np.unique(scatter.reshape(-1, 3), axis=0)) > 10
