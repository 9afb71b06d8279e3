"""The "How to add ..." recipes (docs/architecture.md), followed on a copy of the package: a
dataset, a model family, a loss term and a term with its own trained network, each by editing
exactly the files its recipe names (none in training/), then sharded and trained through the
CLI; the trained network is checkpointed and resumes bitwise. If a recipe needs another file,
this test fails (or the docs lie)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO

pytestmark = pytest.mark.slow

DATASET = '''
"""A toy dataset: 8x8 grey squares of random brightness (the dataset recipe)."""

from pathlib import Path

import numpy as np

from vae_scale.data.sourcing.base import SourceData, seeded_split


def prepare(source_dir: Path, seed: int, download_ok: bool = True) -> SourceData:
    rng = np.random.default_rng(seed)
    images = (rng.random((120, 1, 1, 1)) * np.ones((1, 8, 8, 1)) * 255).astype(np.uint8)
    order = seeded_split(120, {"train": 100, "val": 10, "test": 10}, seed)
    splits = {
        name: [{"__key__": f"toy_{i:03d}", "npy": images[i]} for i in idx]
        for name, idx in order.items()
    }
    return SourceData("toy", (1, 8, 8), splits, source={"generated": True})
'''

MODEL = '''
"""A linear VAE (the model recipe)."""

from typing import Literal

from einops import rearrange
from torch import Tensor, nn

from vae_scale.models.base import VAE, register
from vae_scale.schema import Positive, Section


class LinearVAEConfig(Section):
    name: Literal["linear"] = "linear"
    latent_dim: Positive = 3


@register(LinearVAEConfig)
class LinearVAE(VAE):
    def build(self, cfg: LinearVAEConfig, c: int, h: int, w: int) -> None:
        self.out_channels = self.likelihood.param_channels(c)
        self._latent_dim = cfg.latent_dim
        self.to_stats = nn.Linear(c * h * w, 2 * cfg.latent_dim)
        self.from_z = nn.Linear(cfg.latent_dim, self.out_channels * h * w)

    @property
    def latent_shape(self):
        return (self._latent_dim,)

    def encode(self, x: Tensor):
        return self.to_stats(rearrange(x, "b c h w -> b (c h w)")).chunk(2, dim=1)

    def decode(self, z: Tensor) -> Tensor:
        _, h, w = self.image_shape
        return rearrange(self.from_z(z), "b (c h w) -> b c h w", c=self.out_channels, h=h, w=w)
'''

CONFIG = """
run: {name: recipes}
data: {dataset: toy, batch_size: 20}
model: {name: linear}
train: {epochs: 2, log_every_steps: 1}
eval: {picture_epochs: []}
wandb: {mode: disabled}
"""

PROBE = '''
"""A toy term with its own trained network (the trained-network recipe): a linear probe that
learns each image's mean brightness from its detached posterior mean, from loss.brightness's
start_step, with its own learning rate."""

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from vae_scale.objectives.base import Loss, NetworkSpec, Trained
from vae_scale.objectives.elbo import ElboObjective
from vae_scale.schema import NonNegative, NonNegativeFloat, Section


class BrightnessConfig(Section):
    weight: NonNegativeFloat = 1.0
    start_step: NonNegative = 3
    lr: NonNegativeFloat = 1e-2


class ProbedElbo(ElboObjective):
    name = "probed_elbo"

    def __init__(self, cfg: Any, image_shape: tuple[int, int, int], accelerator: Any):
        super().__init__(cfg, image_shape, accelerator)
        self.probe = nn.Linear(int(torch.tensor(self.vae.latent_shape).prod()), 1)

    def networks(self) -> dict[str, NetworkSpec]:
        rules = self.cfg.train.model_copy(update={"lr": self.cfg.loss.brightness.lr})
        start = self.start_step("probe")
        return {**super().networks(), "probe": NetworkSpec(self.probe, rules, 0.0, start)}

    def start_step(self, name: str) -> int:
        return self.cfg.loss.brightness.start_step if name == "probe" else 0

    def loss(self, nets: Mapping[str, Trained], x: Tensor, step: int) -> Loss:
        out = super().loss(nets, x, step)
        target = x.float().flatten(1).mean(1)
        error = torch.zeros_like(target)
        if step >= self.start_step("probe"):
            mu, _ = nets["vae"].unwrapped.encode(x)
            error = (nets["probe"].model(mu.detach().flatten(1)).squeeze(1) - target).pow(2)
        out.terms["probe_mse"] = error.detach()
        weight = self.cfg.loss.brightness.weight
        return Loss(out.loss + weight * error.mean(), out.terms, out.values)
'''

LOSS_TERM = '''

def latent_energy(mu: Tensor) -> Tensor:
    """Per row: the squared norm of the posterior mean (the loss-term recipe)."""
    return mu.float().flatten(1).pow(2).sum(1)
'''


# recipe -> its edits: (file, text replaced exactly once, its replacement); None: a new file
EDITS = {
    "dataset": [
        ("data/sourcing/toy.py", None, DATASET),
        ("data/sourcing/recipes.py", "folder, frey, mnist\n", "folder, frey, mnist, toy\n"),
        (
            "data/sourcing/recipes.py",
            "    return {\n",
            '    return {\n        "toy": DatasetRecipe(toy.prepare, "toy", 50),\n',
        ),
    ],
    "model": [
        ("models/linear.py", None, MODEL),
        ("models/__init__.py", "hierarchical, mlp, resnet", "hierarchical, linear, mlp, resnet"),
    ],
    "loss term": [
        (
            "losses.py",
            "\n\n@dataclass\nclass ELBOTerms:",
            LOSS_TERM + "\n\n@dataclass\nclass ELBOTerms:",
        ),
        (
            "objectives/elbo.py",
            "import kl_weight, neg_elbo",
            "import kl_weight, latent_energy, neg_elbo",
        ),
        (
            "objectives/elbo.py",
            "        terms, aug_cfg = dict(elbo.named), cfg.encoder_aug\n",
            "        terms, aug_cfg = dict(elbo.named), cfg.encoder_aug\n"
            '        terms["latent_energy"] = latent_energy(out.mu)\n',
        ),
        (
            "objectives/elbo.py",
            'return Loss(elbo.loss, terms, {"kl_weight": beta})',
            'return Loss(\n            elbo.loss + 1e-3 * terms["latent_energy"].mean(), terms, '
            '{"kl_weight": beta}\n        )',
        ),
    ],
    "trained network": [
        ("objectives/probe_term.py", None, PROBE),
        (
            "objectives/__init__.py",
            "for cls in (ElboObjective, AutoencoderObjective, FlowMatchingObjective)",
            "for cls in (ElboObjective, AutoencoderObjective, FlowMatchingObjective, ProbedElbo)",
        ),
        (
            "objectives/__init__.py",
            "from vae_scale.objectives.elbo import ElboObjective\n",
            "from vae_scale.objectives.elbo import ElboObjective\n"
            "from vae_scale.objectives.probe_term import ProbedElbo\n",
        ),
        (
            "config.py",
            "from vae_scale.objectives.perceptual import PerceptualConfig\n",
            "from vae_scale.objectives.perceptual import PerceptualConfig\n"
            "from vae_scale.objectives.probe_term import BrightnessConfig\n",
        ),
        (
            "config.py",
            "    pixel: PixelLossConfig = Field(default_factory=PixelLossConfig)\n",
            "    pixel: PixelLossConfig = Field(default_factory=PixelLossConfig)\n"
            "    brightness: BrightnessConfig = Field(default_factory=BrightnessConfig)\n",
        ),
    ],
}


def apply(package: Path, file: str, old: str | None, new: str) -> None:
    path = package / file
    if old is None:
        assert not path.exists(), file
        path.write_text(new)
        return
    text = path.read_text()
    assert text.count(old) == 1, (file, old)
    path.write_text(text.replace(old, new))


def test_a_dataset_a_model_and_a_loss_term_each_take_the_files_their_recipe_names(tmp_path):
    package = tmp_path / "src" / "vae_scale"
    shutil.copytree(REPO / "vae_scale", package, ignore=shutil.ignore_patterns("__pycache__"))
    for edits in EDITS.values():
        for edit in edits:
            apply(package, *edit)
    # each recipe's files, as docs/architecture.md's "How to add ..." names them
    assert {k: sorted({e[0] for e in v}) for k, v in EDITS.items()} == {
        "dataset": ["data/sourcing/recipes.py", "data/sourcing/toy.py"],
        "model": ["models/__init__.py", "models/linear.py"],
        "loss term": ["losses.py", "objectives/elbo.py"],
        "trained network": ["config.py", "objectives/__init__.py", "objectives/probe_term.py"],
    }
    assert not any(e[0].startswith("training/") for v in EDITS.values() for e in v)

    env = {**os.environ, "PYTHONPATH": str(package.parent), "OMP_NUM_THREADS": "1"}

    def cli(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "vae_scale", *args], cwd=tmp_path, env=env,
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    cli("shard", "toy", "--out", str(tmp_path / "shards"), "--source", str(tmp_path))
    index = json.loads((tmp_path / "shards/toy/index.json").read_text())
    assert {k: v["num_samples"] for k, v in index["splits"].items()} == {
        "train": 100, "val": 10, "test": 10,
    }  # fmt: skip
    (tmp_path / "toy_linear.yaml").write_text(CONFIG)
    cli(
        "train", str(tmp_path / "toy_linear.yaml"), f"data.shards_dir={tmp_path / 'shards'}",
        f"run.dir={tmp_path / 'runs'}",
    )  # fmt: skip
    run = tmp_path / "runs/recipes"
    epochs = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [json.loads(r) for r in (run / "steps.jsonl").read_text().splitlines()]
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == {"name": "linear", "latent_dim": 3}
    assert config["dataset_index"]["image_shape"] == [1, 8, 8]
    assert [r["train/num_samples"] for r in epochs] == [100, 100]
    assert all(r["train/latent_energy"] > 0 for r in epochs)  # the epoch sums took the term
    assert len(steps) == 10 and all(r["train/step_latent_energy"] > 0 for r in steps)
    assert epochs[-1]["test/neg_elbo"] < epochs[0]["test/neg_elbo"]

    # the trained network: it trains from its start, is checkpointed and resumes bitwise
    probed = [
        "loss.objective=probed_elbo",
        "train.checkpoint_every_steps=2",
        "loss.brightness.lr=0.1",
    ]
    config = str(tmp_path / "toy_linear.yaml")
    where = [f"data.shards_dir={tmp_path / 'shards'}", f"run.dir={tmp_path / 'runs'}"]
    cli("train", config, *where, "run.name=probed", *probed)
    cli("train", config, *where, "run.name=resumed", *probed, "train.epochs=1")
    cli("train", config, *where, "run.name=resumed", *probed)  # epoch 2 from its checkpoint
    rows = {
        name: [json.loads(r) for r in (tmp_path / "runs" / name / "steps.jsonl").open()]
        for name in ("probed", "resumed")
    }
    assert rows["probed"] == rows["resumed"]  # every logged value, bitwise
    mse = [r["train/step_probe_mse"] for r in rows["probed"]]
    assert mse[:2] == [0.0, 0.0] and all(m > 0 for m in mse[3:])  # from its start_step
    assert sum(mse[-3:]) < sum(mse[3:6]), mse  # it learns
    assert all(r["train/probe_lr"] > 0 for r in rows["probed"][3:])
    final = {}
    for name in ("probed", "resumed"):
        last = sorted((tmp_path / "runs" / name / "checkpoints").glob("step_*"))[-1]
        final[name] = {f: load_file(last / f) for f in ("model.safetensors", "model_1.safetensors")}
        assert (last / "probe_policy.json").is_file()
    for file, tensors in final["probed"].items():
        assert all(torch.equal(v, final["resumed"][file][k]) for k, v in tensors.items())
