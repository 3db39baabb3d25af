"""Sweep definitions: parsing axes, their errors, the points a grid spans, their names and configurations."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kmnist.cli import main
from kmnist.config import resolve_config
from kmnist.errors import KmnistError
from kmnist.sweep_spec import (SweepSpec, build_spec, bundled_definitions, check_points, grid_points, parse_axis,
                               point_config, trial_name)


def test_axes_are_typed_like_their_fields() -> None:
    assert parse_axis("batch_size=64,128").values == (64, 128)
    assert parse_axis("lr=0.01, 1e-3").values == (0.01, 0.001)
    assert parse_axis("model_args.patch=2,4,7,14").values == (2, 4, 7, 14)
    assert parse_axis("preset=report-row1,report-final").values == ("report-row1", "report-final")
    assert parse_axis("class-weighting=true,false").name == "class_weighting"
    assert parse_axis("class_weighting=true,false").values == (True, False)
    ranged = parse_axis("lr=1e-4..1e-1:log")
    assert (ranged.low, ranged.high, ranged.log) == (1e-4, 0.1, True)
    assert parse_axis("batch_size=32..512").low == 32 and isinstance(parse_axis("batch_size=32..512").high, int)


@pytest.mark.parametrize("arguments, fragment", [
    ({"grid": ["nope=1,2"]}, "unknown sweep axis 'nope'"),
    ({"grid": ["seed=0,1"]}, "use --seeds"),
    ({"grid": ["threads=1,2"]}, "where a trial runs"),
    ({"grid": ["model_args=1"]}, "model_args.NAME"),
    ({"grid": ["lr"]}, "NAME=V1,V2"),
    ({"grid": ["lr="]}, "NAME=V1,V2"),
    ({"grid": ["lr=0.1,,0.2"]}, "empty value"),
    ({"grid": ["lr=0.1,0.10"]}, "more than once"),
    ({"grid": ["batch_size=64,big"]}, "batch_size must be a whole number"),
    ({"grid": ["lr=1e-4..1e-1"]}, "a grid needs lists of values"),
    ({"grid": ["preset=report-row1,nope"]}, "unknown preset 'nope'"),
    ({"grid": ["lr=0.1,0.2", "lr=0.3"]}, "axis given twice"),
    ({"grid": ["lr=0.1,0.2"], "config": {"lr": 0.5}}, "lr is both fixed"),
    ({"grid": ["preset=report-row1"], "preset": "report-final"}, "preset is both fixed"),
    ({"grid": ["model_args.patch=2,4"], "config": {"model_args": {"patch": 7}}}, "both fixed"),
    ({"grid": ["lr=0.1"], "seeds": 0}, "--seeds must be"),
    ({"random": ["lr=0.2..0.1"], "trials": 3}, "low < high"),
    ({"random": ["lr=0..0.1:log"], "trials": 3}, "positive low end"),
    ({"random": ["optimizer=adam..sgd"], "trials": 3}, "not numeric"),
    ({"random": ["lr=1e-4..1e-1"]}, "needs --trials"),
    ({"random": ["lr=1e-4..1e-1"], "trials": 0}, "--trials must be at least 1, got 0"),
    ({"tpe": ["batch_size=64,128"], "trials": 3}, "only 2 points"),
    ({"grid": ["lr=0.1"], "trials": 3}, "--trials is for random/TPE"),
    ({"grid": ["teacher=x/best.pt,x_best.pt"]}, "'x/best.pt' and 'x_best.pt' would share the run folder name"),
    ({}, "give exactly one of"),
    ({"grid": ["lr=0.1"], "random": ["lr=0.1"]}, "give exactly one of"),
    ({"definition": "no-such-sweep"}, "unknown sweep 'no-such-sweep'"),
])
def test_bad_sweeps_are_refused(arguments: dict, fragment: str) -> None:
    with pytest.raises(KmnistError) as error:
        build_spec(**arguments)
    assert fragment in str(error.value)


def test_grid_points_names_and_seeds() -> None:
    spec = build_spec(grid=["batch_size=64,128,256,512", "lr=0.01,0.05,0.001", "epochs=20,30"], seeds=3,
                      config={"seed": 10})
    points = grid_points(spec)
    assert len(points) == 4 * 3 * 2 * 3
    assert {point["seed"] for point in points} == {10, 11, 12}
    names = [trial_name(spec, point) for point in points]
    assert len(set(names)) == len(names)
    assert names[0] == "batch_size=64,lr=0.01,epochs=20,seed=10"
    assert trial_name(build_spec(grid=["lr=1e-5"]), {"lr": 1e-5, "seed": 0}) == "lr=1e-05,seed=0"
    patch = build_spec(grid=["model_args.patch=2,4"])
    assert [trial_name(patch, p) for p in grid_points(patch)] == ["model_args.patch=2,seed=0",
                                                                   "model_args.patch=4,seed=0"]


def test_point_config_is_the_preset_then_fixed_fields_then_the_point() -> None:
    spec = build_spec(grid=["preset=report-row1,report-final"], config={"epochs": "2", "threads": "1"})
    assert "threads" not in spec.config  # placement: set per worker, not part of the sweep
    row1, final = (point_config(spec, point) for point in grid_points(spec))
    assert (row1.batch_size, row1.lr, row1.epochs) == (64, 0.01, 2)
    assert (final.batch_size, final.lr, final.epochs) == (128, 0.001, 2)
    assert row1 == resolve_config(preset="report-row1", overrides={"epochs": 2})
    spec = build_spec(grid=["model_args.patch=7", "lr=0.002"], preset="report-final",
                      config={"model_args": {"token_hidden": 32}})
    config = point_config(spec, grid_points(spec)[0], placement={"threads": 3})
    assert config.model_args == {"token_hidden": 32, "patch": 7} and config.lr == 0.002 and config.threads == 3


def test_spec_round_trip() -> None:
    spec = build_spec(tpe=["lr=1e-4..1e-2:log", "batch_size=64,128"], trials=5, seeds=2, preset="report-row2")
    assert SweepSpec.from_dict(spec.to_dict()) == spec


def test_bundled_sweeps() -> None:
    assert {"table41", "patch-size"} <= set(bundled_definitions())
    table = build_spec(definition="table41")
    names = [trial_name(table, point) for point in grid_points(table)]
    assert len(names) == 12 and names[0] == "preset=report-row1,seed=0" and names[-1] == "preset=report-final,seed=2"
    patch = build_spec(definition="patch-size", seeds=1, config={"epochs": 2})
    assert patch.preset == "report-final" and patch.seeds == (0,)
    assert [point_config(patch, p).model_args for p in grid_points(patch)] == [{"patch": p} for p in (2, 4, 7, 14)]
    assert all(point_config(patch, p).epochs == 2 for p in grid_points(patch))
    check_points(patch, grid_points(patch))


def test_definition_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text('method = "random"\ntrials = 4\nseeds = 2\n[config]\nepochs = 3\n'
                    '[space]\nlr = { low = 1e-4, high = 1e-2, log = true }\n[space.model_args]\npatch = [4, 7]\n')
    spec = build_spec(definition=str(path))
    assert spec.name == "mine" and spec.method == "random" and spec.trials == 4 and spec.seeds == (0, 1)
    assert spec.config == {"epochs": 3}
    assert [axis.name for axis in spec.axes] == ["lr", "model_args.patch"]


@pytest.mark.parametrize("line, fragment", [('trials = "5"', "--trials must be a whole number, got '5'"),
                                            ("trials = 2.5", "--trials must be a whole number, got 2.5"),
                                            ('preset = ["x"]', "unknown preset ['x']"),
                                            ("config = 5", "config must be a table of field = value, got 5")])
def test_definition_file_values_of_the_wrong_type(tmp_path: Path, line: str, fragment: str) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(f'method = "random"\n{line}\n' + ("trials = 4\n" if "trials" not in line else "")
                    + "[space]\nlr = { low = 1e-4, high = 1e-2, log = true }\n")
    with pytest.raises(KmnistError, match=re.escape(fragment)):
        build_spec(definition=str(path))


def test_impossible_points_fail_before_any_work() -> None:
    spec = build_spec(grid=["model_args.patch=4,5"])
    with pytest.raises(KmnistError, match="model_args.patch=5.*patch must divide"):
        check_points(spec, grid_points(spec))


def test_cli_errors_and_dry_run(tmp_path: Path, capsys, monkeypatch) -> None:
    assert main(["sweep", "--grid", "nope=1", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown sweep axis" in err[0]
    assert main(["sweep", "--grid", "lr=0.1,0.2"]) == 2
    assert "--out DIR is needed" in capsys.readouterr().err

    import kmnist.sweep

    monkeypatch.setattr(kmnist.sweep, "available_cores", lambda: 2)
    assert main(["sweep", "--grid", "lr=0.1,0.2,0.3,0.4", "--jobs", "4", "--threads", "1", "--out",
                 str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--jobs 4 x 1 threads per worker = 4 threads, more than the 2 cores" in err[0]
    assert not (tmp_path / "s").exists()

    assert main(["sweep", "--sweep", "patch-size", "--dry-run", "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "12 runs" in out and "trials/model_args.patch=14,seed=2" in out and "epochs=2" in out

    # --grid given twice adds axes (it used to keep only the last); an axis given twice is refused.
    assert main(["sweep", "--grid", "lr=0.1,0.2", "--grid", "batch_size=64,128", "--dry-run", "--out",
                 str(tmp_path / "g")]) == 0
    assert "grid sweep over lr, batch_size; seed 0: 4 runs" in capsys.readouterr().out
    assert main(["sweep", "--grid", "lr=0.1,0.2", "--grid", "lr=0.3", "--dry-run", "--out", str(tmp_path / "g")]) == 2
    assert "sweep axis given twice: lr" in capsys.readouterr().err
    # A dry run checks its points as a real sweep does.
    assert main(["sweep", "--grid", "lr=-1,0.1", "--dry-run", "--out", str(tmp_path / "g")]) == 2
    assert "sweep point lr=-1: lr must be positive" in capsys.readouterr().err
    # ... and the folder it names: one holding another sweep is refused now, not only by the real command.
    from kmnist.sweep import SweepPlacement, record_sweep

    (tmp_path / "taken").mkdir()
    record_sweep(build_spec(grid=["lr=0.1,0.2"]), SweepPlacement(out=tmp_path / "taken", data_dir=tmp_path))
    assert main(["sweep", "--grid", "lr=0.1,0.2", "--dry-run", "--out", str(tmp_path / "taken")]) == 0
    capsys.readouterr()
    assert main(["sweep", "--grid", "lr=0.3,0.4", "--dry-run", "--out", str(tmp_path / "taken")]) == 2
    assert "holds a different sweep (it differs in axes)" in capsys.readouterr().err
