"""Config loading: every shipped YAML loads; every problem is reported at once with its full key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from redheart_tune.config import Config, ConfigError, config_from_dict, config_to_dict, load_config

REPO = Path(__file__).resolve().parent.parent

SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def test_three_configs_are_shipped():
    assert {p.name for p in SHIPPED} >= {"default.yaml", "smoke.yaml", "redheart-730m.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # Each YAML opens with a comment saying what it is for and how to run it.
    assert path.read_text().startswith("#") and "python run.py" in path.read_text()


def test_730m_has_the_spec_settings():
    cfg = load_config(REPO / "configs" / "redheart-730m.yaml")
    assert cfg.sweep.lrs == (1e-5, 5e-5, 1e-4, 2e-4, 5e-4) and cfg.sweep.epochs == 5
    assert (cfg.optim.batch_size, cfg.optim.grad_accum) == (4, 16)
    assert cfg.optim.precision == "auto" and cfg.train.epochs == 60 and cfg.train.checkpoint_every == 2
    assert cfg.model.preset == "redheart-730m" and cfg.data.max_samples == 10000


def test_overrides_apply_and_parse_yaml_values():
    cfg = load_config(
        REPO / "configs" / "default.yaml", ["sweep.epochs=4", "sweep.lrs=[1e-5, 2e-4]", "run.seed=7"]
    )
    assert cfg.sweep.epochs == 4 and cfg.sweep.lrs == (1e-5, 2e-4) and cfg.run.seed == 7


def test_all_problems_reported_at_once_with_key_paths():
    with pytest.raises(ConfigError) as err:
        load_config(
            REPO / "configs" / "default.yaml",
            ["sweep.epoch=2", "optim.lr=abc", "data.source=foo", "resources.gpu=2", "bogus.x=1"],
        )
    msg = str(err.value)
    assert "5 problem(s)" in msg
    for needle in (
        "sweep.epoch: unknown key",
        "optim.lr: 'abc'",
        "data.source: 'foo'",
        "resources.gpu",
        "bogus: unknown key",
    ):
        assert needle in msg, needle
    assert "allowed keys here: lrs, epochs" in msg


def test_unknown_key_in_file_is_named(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"optim\.learning_rate: unknown key"):
        load_config(f)


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="data.split"):
        config_from_dict({"data": {"split": [0.5, 0.1, 0.1]}})
    with pytest.raises(ConfigError, match="data.path: required"):
        config_from_dict({"data": {"source": "redheart"}})
    with pytest.raises(ConfigError, match="model.fusion_weights.backbone"):
        config_from_dict({"model": {"fusion_weights": {"backbone": 1.0}}})


def test_round_trip_through_plain_dict():
    cfg = load_config(REPO / "configs" / "smoke.yaml")
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_missing_file_says_where_configs_are(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")
