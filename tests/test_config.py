from pathlib import Path

import pytest

from vae_scale.config import config_from_dict, load_config, parse_override
from vae_scale.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
FREY = REPO / "configs" / "frey_conv.yaml"


def test_all_shipped_configs_load():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.train.epochs >= 1, path


def test_frey_config_is_the_study_setup():
    study = load_config(REPO / "configs" / "frey_conv_bce.yaml")
    assert (study.model.name, study.model.num_layers, study.loss.likelihood) == (
        "conv",
        5,
        "bernoulli",
    )
    assert study.train.epochs == 20 and study.eval.picture_epochs == [1, 20]
    default = load_config(FREY)  # the same model and schedule with an 8-bit likelihood
    assert default.model == study.model and default.train.epochs == 20
    assert (default.loss.likelihood, default.loss.beta) == ("gaussian", 1.0)  # a true ELBO


@pytest.mark.parametrize(
    "override, culprit",
    [
        ("train.lrr=0.1", "train.lrr"),
        ("train.lr=-1", "train.lr"),
        ("train.lr=abc", "train.lr"),
        ("train.epochs=2.5", "train.epochs"),
        ("data.batch_size=0", "data.batch_size"),
        ("train.mixed_precision=fp8", "train.mixed_precision"),
        ("model.latent_dimm=3", "model.latent_dimm"),
        ("model.name=transformer", "model.name"),
        ("loss.likelihood=poisson", "loss.likelihood"),
        ("eval.picture_epochs=[0]", "eval.picture_epochs"),
        ("eval.refine_steps=-1", "eval.refine_steps"),
    ],
)
def test_bad_values_name_the_key(override, culprit):
    with pytest.raises(ConfigError) as err:
        load_config(FREY, [override])
    assert culprit in str(err.value)


def test_unknown_section_and_key_in_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: conv}\ntrainn: {lr: 0.1}\n")
    with pytest.raises(ConfigError, match="trainn"):
        load_config(bad)
    bad.write_text("model: {name: conv}\ntrain: {learning_rate: 0.1}\n")
    with pytest.raises(ConfigError, match=r"train\.learning_rate.*allowed keys"):
        load_config(bad)


def test_yaml_is_parsed_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(evil)


def test_overrides_parse_values():
    assert parse_override("train.lr=3e-4") == (["train", "lr"], 3e-4)
    assert parse_override("eval.picture_epochs=[1, 5]") == (["eval", "picture_epochs"], [1, 5])
    cfg = load_config(FREY, ["train.lr=3e-4", "model.latent_dim=8", "train.mixed_precision=bf16"])
    assert (cfg.train.lr, cfg.model.latent_dim, cfg.train.mixed_precision) == (3e-4, 8, "bf16")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("train.lr")


def test_missing_model_name_and_cross_section_check():
    with pytest.raises(ConfigError, match="model.name"):
        config_from_dict({"model": {"latent_dim": 2}})
    with pytest.raises(ConfigError, match="loss.likelihood"):
        config_from_dict(
            {
                "model": {"name": "conv"},
                "data": {"binarize": "dynamic"},
                "loss": {"likelihood": "gaussian"},
            }
        )


def test_unquoted_off_is_the_progress_choice(tmp_path):
    assert load_config(FREY, ["train.progress=off"]).train.progress == "off"
    path = tmp_path / "quiet.yaml"
    path.write_text("model: {name: mlp}\ntrain:\n  progress: off\n")
    assert load_config(path).train.progress == "off"
    with pytest.raises(ConfigError, match="train.progress"):
        load_config(FREY, ["train.progress=on"])  # true is no choice: an error naming the key


def test_unquoted_no_is_the_mixed_precision_choice():
    cfg = load_config(FREY, ["train.mixed_precision=no"])
    assert cfg.train.mixed_precision == "no"
