"""Resolving a configuration: defaults, preset, config file and command line, model arguments merged."""

from __future__ import annotations

import pytest

from kmnist.config import PRESETS, TrainConfig, resolve_config, same_experiment
from kmnist.errors import KmnistError
from kmnist.sweep_spec import build_spec, point_config


def test_model_arguments_merge_argument_by_argument() -> None:
    config = resolve_config(preset="quick-cnn", overrides={"model_args": {"width": 24}})
    assert config.model_args == {**PRESETS["quick-cnn"]["model_args"], "width": 24}
    config = resolve_config(preset="cnn-fast-cpu", file_values={"model_args": {"depth": 2, "dropout": 0.1}},
                            overrides={"model_args": {"dropout": 0.2}})
    assert config.model_args == {"width": PRESETS["cnn-fast-cpu"]["model_args"]["width"], "depth": 2, "dropout": 0.2}


def test_another_model_starts_from_its_own_defaults() -> None:
    config = resolve_config(preset="quick-cnn", overrides={"model": "report-mixer"})
    assert config.model == "report-mixer" and config.model_args == {}
    config = resolve_config(preset="quick-cnn", overrides={"model": "report-mixer", "model_args": {"patch": 7}})
    assert config.model_args == {"patch": 7}
    # Naming the preset's own model keeps its arguments.
    config = resolve_config(preset="quick-cnn", overrides={"model": "resnet-small"})
    assert config.model_args == PRESETS["quick-cnn"]["model_args"]


def test_bad_model_arguments_and_presets_are_refused() -> None:
    with pytest.raises(KmnistError, match="model_args must be a table"):
        resolve_config(file_values={"model_args": [1, 2]})
    with pytest.raises(KmnistError, match="unknown preset"):
        resolve_config(preset="nope")


def test_sweep_points_keep_the_presets_model_arguments() -> None:
    spec = build_spec(grid=["epochs=1"], preset="cnn-fast-cpu", config={"model_args": {"width": 16}})
    config = point_config(spec, {"epochs": 1, "seed": 0})
    assert config.model_args == {**PRESETS["cnn-fast-cpu"]["model_args"], "width": 16}


@pytest.mark.parametrize("encoding", ["utf-16", "utf-8-sig"])
def test_config_files_and_sweep_definitions_in_other_encodings(tmp_path, encoding: str) -> None:
    from kmnist.config import load_config_file
    from kmnist.sweep_spec import load_definition

    (tmp_path / "c.toml").write_text("epochs = 1\n", encoding=encoding)
    (tmp_path / "s.toml").write_text("[grid]\nlr = [0.1, 0.2]\n", encoding=encoding)
    if encoding == "utf-8-sig":  # a byte-order mark, as some editors write it: read as UTF-8
        assert load_config_file(tmp_path / "c.toml") == {"epochs": 1}
        assert load_definition(str(tmp_path / "s.toml"))[1] == {"grid": {"lr": [0.1, 0.2]}}
        return
    with pytest.raises(KmnistError, match="is not UTF-8 text .it looks like UTF-16.; save it as UTF-8"):
        load_config_file(tmp_path / "c.toml")
    with pytest.raises(KmnistError, match="is not UTF-8 text"):
        load_definition(str(tmp_path / "s.toml"))


def test_a_folder_or_a_missing_file_is_named_as_such(tmp_path) -> None:
    from kmnist.config import load_config_file
    from kmnist.sweep_spec import load_definition

    with pytest.raises(KmnistError, match="is a folder"):
        load_config_file(tmp_path)
    with pytest.raises(KmnistError, match="sweep definition not found: .*nothing.toml"):
        load_definition(str(tmp_path / "nothing.toml"))


def test_a_dry_run_refuses_a_search_without_a_validation_split(capsys) -> None:
    from kmnist.cli import main

    assert main(["sweep", "--random", "lr=0.001..0.1", "--trials", "2", "--val-size", "0", "--dry-run"]) == 2
    assert "needs --val-size > 0" in capsys.readouterr().err


def test_one_computation_is_one_experiment_however_its_model_arguments_are_written() -> None:
    plain = TrainConfig().to_dict()
    assert same_experiment(plain, TrainConfig(model_args={"patch": 4}).to_dict())  # 4 is the model's default
    assert not same_experiment(plain, TrainConfig(model_args={"patch": 7}).to_dict())
    assert same_experiment(plain, {**plain, "threads": 2, "device": "cpu"})  # placement aside
    assert not same_experiment(plain, {**plain, "lr": 0.01})
    unknown = {**plain, "model": "retired-model", "model_args": {"width": 3}}
    assert same_experiment(unknown, dict(unknown)) and not same_experiment(unknown, {**unknown, "model_args": {}})


def test_a_config_keeps_its_own_copy_of_the_model_arguments() -> None:
    given = {"patch": 7}
    config = TrainConfig(model_args=given)
    given["patch"] = 2
    assert config.model_args == {"patch": 7}
