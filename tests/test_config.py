"""Config loading: _base_ inheritance, overrides, and the errors a user sees."""

from __future__ import annotations

import pytest

from elastic_det.config.schema import Config, config_hash, diff, load_config, to_dict, to_yaml
from elastic_det.errors import ConfigError


def write(path, text):
    path.write_text(text)
    return path


def test_defaults_are_the_embedded_default():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.model.type == "tiny_fcos" and cfg.data.type == "shapes"


def test_yaml_twin_of_the_default_matches_the_schema_defaults():
    assert load_config("configs/default.yaml") == Config()


def test_base_inheritance_merges_in_order(tmp_path):
    write(tmp_path / "a.yaml", "data:\n  global_batch_size: 8\noptimizer:\n  lr: 0.1\n")
    write(tmp_path / "b.yaml", "optimizer:\n  lr: 0.2\n  momentum: 0.5\n")
    (tmp_path / "sub").mkdir()
    child = write(tmp_path / "sub" / "c.yaml", "_base_: [../a.yaml, ../b.yaml]\noptimizer:\n  momentum: 0.7\n")
    cfg = load_config(child)
    assert cfg.data.global_batch_size == 8
    assert cfg.optimizer.lr == 0.2  # b overrides a
    assert cfg.optimizer.momentum == 0.7  # the file overrides its bases


def test_overrides_with_lists_and_nested_keys(tmp_path):
    cfg = load_config(None, ["schedule.milestones=[100,200]", "train.max_steps=7", "checkpoint.async=true",
                             "data.train_transforms.min_size=[96,128]"])
    assert cfg.schedule.milestones == [100, 200]
    assert cfg.train.max_steps == 7
    assert cfg.checkpoint.async_save is True
    assert cfg.data.train_transforms.min_size == [96, 128]


def test_unknown_key_names_full_path_and_closest_valid_key(tmp_path):
    path = write(tmp_path / "typo.yaml", "data:\n  global_bach_size: 8\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "data.global_bach_size" in str(e.value)
    assert "data.global_batch_size" in str(e.value)


def test_unknown_override_key():
    with pytest.raises(ConfigError, match="Did you mean 'train.max_steps'"):
        load_config(None, ["train.max_step=3"])


@pytest.mark.parametrize("override, key, expected", [
    ("train.max_steps=abc", "train.max_steps", "int"),
    ("optimizer.lr=[1,2]", "optimizer.lr", "float"),
    ("train.validate=3", "train.validate", "bool"),
    ("schedule.milestones=5", "schedule.milestones", "list"),
])
def test_wrong_type_names_key_value_and_expected_type(override, key, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert key in msg and expected in msg and override.split("=", 1)[1].strip("[]").split(",")[0] in msg


def test_missing_base_names_both_files(tmp_path):
    child = write(tmp_path / "c.yaml", "_base_: nowhere.yaml\n")
    with pytest.raises(ConfigError) as e:
        load_config(child)
    assert "nowhere.yaml" in str(e.value) and "c.yaml" in str(e.value)


def test_base_cycle_is_reported(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = write(tmp_path / "bad.yaml", "data: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")


def test_bad_choice_and_malformed_override():
    with pytest.raises(ConfigError, match="train.amp"):
        load_config(None, ["train.amp=fp8"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["train.max_steps"])


def test_yaml_round_trip_and_hash(tmp_path):
    cfg = load_config(None, ["checkpoint.async=true", "seed=3"])
    path = write(tmp_path / "dump.yaml", to_yaml(cfg))
    assert load_config(path) == cfg
    assert config_hash(cfg) != config_hash(Config())
    changes = diff(to_dict(Config()), to_dict(cfg))
    assert "seed: 0 -> 3" in changes and "checkpoint.async: False -> True" in changes
