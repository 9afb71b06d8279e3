"""Models people can use: `vae-scale export` writes the Hub folder layout, and
`vae_scale.from_pretrained` gives the trained checkpoint's outputs, bit for bit; the docs'
Python snippet runs as written."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_frey_config
from vae_scale.errors import ConfigError

pytestmark = pytest.mark.slow  # trains a tiny run


@pytest.fixture(scope="module")
def trained(frey_shards, tmp_path_factory):
    """A tiny Frey run with an EMA of its weights, evaluated once (eval_test.json)."""
    from vae_scale.cli import main
    from vae_scale.training.loop import train

    base = tmp_path_factory.mktemp("hub")
    cfg = tiny_frey_config(frey_shards, base, "run.name=frey_conv", "train.ema_decay=0.9")
    run_dir = train(cfg, command="vae-scale train configs/frey_conv.yaml train.ema_decay=0.9")
    assert main(["eval", str(run_dir), "--iw-samples", "0"]) == 0
    return run_dir


def run_cli(args, capsys) -> tuple[int, str]:
    from vae_scale.cli import main

    code = main(args)
    return code, capsys.readouterr().err


def test_export_then_from_pretrained_equals_the_checkpoint(trained, tmp_path, capsys):
    import vae_scale
    from vae_scale.analysis.runs import load_run
    from vae_scale.training import checkpoint

    out = tmp_path / "exported"
    assert run_cli(["export", str(trained), str(out)], capsys)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "config.json", "model.safetensors", "samples.png",
    ]  # fmt: skip
    ckpt = checkpoint.latest_checkpoint(trained / "checkpoints")
    assert (out / "model.safetensors").read_bytes() == (ckpt / "ema.safetensors").read_bytes()
    record = json.loads((out / "config.json").read_text())
    assert record["export"]["weights"] == "ema" and record["export"]["checkpoint"] == ckpt.name
    assert record["model"] == json.loads((trained / "config.json").read_text())["model"]

    card = (out / "README.md").read_text()
    evaluation = json.loads((trained / "eval_test.json").read_text())
    assert card.startswith("---\nlibrary_name: vae_scale\n")
    assert f"| test/neg_elbo | {evaluation['test/neg_elbo']:.4f} |" in card
    assert "![64 samples" in card and "(samples.png)" in card
    assert "vae-scale train configs/frey_conv.yaml train.ema_decay=0.9" in card

    reference = load_run(trained).model  # the checkpoint's EMA weights, as eval uses them
    for source in (out, trained):
        vae = vae_scale.from_pretrained(source)
        assert vae.image_shape == (1, 28, 20) and vae.latent_shape == (8,)
        faces = (torch.rand(5, 1, 28, 20) * 255).to(torch.uint8)
        floats = faces.float() / 255
        with torch.no_grad():
            mu, log_var = reference.encode(floats)
            assert torch.equal(vae.encode(faces).mean, mu)
            assert torch.equal(vae.encode(floats).log_var, log_var)
            assert torch.equal(vae.reconstruct(faces), reference.reconstruct(floats))
            assert torch.equal(vae.reconstruct(faces[0]), reference.reconstruct(floats[:1]))
            assert torch.equal(vae.decode(mu), reference.likelihood.mean(reference.decode(mu)))
            draws = [vae.sample(6, 0.7, torch.Generator().manual_seed(3))]
            draws.append(reference.sample(6, torch.Generator().manual_seed(3), 0.7))
            assert torch.equal(*draws) and draws[0].shape == (6, 1, 28, 20)

    raw = tmp_path / "raw"
    assert run_cli(["export", str(trained), str(raw), "--weights", "raw"], capsys)[0] == 0
    assert (raw / "model.safetensors").read_bytes() == (ckpt / "model.safetensors").read_bytes()


def test_export_refuses_a_folder_with_other_files(trained, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    code, err = run_cli(["export", str(trained), str(folder)], capsys)
    assert code == 2 and "notes.txt" in err and "Traceback" not in err
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "unreachable endpoint"])
def test_push_to_hub_offline_says_why_and_keeps_the_folder(
    trained, tmp_path, capsys, monkeypatch, offline
):
    if offline == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    out = tmp_path / "pushed"
    code, err = run_cli(["export", str(trained), str(out), "--push-to-hub", "me/frey"], capsys)
    assert code == 2 and "Traceback" not in err
    assert "--push-to-hub me/frey" in err and f"{out} is complete" in err
    assert ("HF_HUB_OFFLINE" if offline == "HF_HUB_OFFLINE" else "cannot be reached") in err
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()


def test_from_pretrained_says_what_it_expected(trained, tmp_path):
    import vae_scale

    vae = vae_scale.from_pretrained(trained)
    with pytest.raises(ValueError, match=r"expected shape \(B, 1, 28, 20\).*got \(2, 28, 20\)"):
        vae.reconstruct(torch.zeros(2, 28, 20))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        vae.encode(torch.full((1, 1, 28, 20), 255.0))
    with pytest.raises(ConfigError, match="not a vae_scale model"):
        vae_scale.from_pretrained(tmp_path)


def docs_block(heading: str, language: str, page: str = "docs/evaluation.md") -> str:
    """The first ```language block under `heading` in a docs page."""
    text = (REPO / page).read_text()
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(rf"```{language}\n(.*?)```", section, re.S).group(1)


def test_readme_python_snippet_runs_as_written(trained, tmp_path, monkeypatch):
    """The docs' commands and snippet, in a folder whose runs/frey_conv is a trained run."""
    shutil.copytree(trained, tmp_path / "runs" / "frey_conv")
    monkeypatch.chdir(tmp_path)
    bin_dir = Path(sys.executable).parent
    for line in docs_block("Use a trained model from Python", "bash").splitlines():
        if line.strip() and not line.startswith("#"):
            command = line.split("#")[0].strip()
            assert command.startswith("vae-scale ")
            subprocess.run([str(bin_dir / "vae-scale"), *command.split()[1:]], check=True)
    namespace: dict = {}
    exec(docs_block("Use a trained model from Python", "python"), namespace)
    faces, recons = namespace["faces"], namespace["recons"]
    assert faces.shape == recons.shape == (16, 1, 28, 20)
    assert 0 <= float(faces.min()) and float(faces.max()) <= 1
    assert namespace["posterior"].mean.shape == (16, 8)
