"""Sweeps for real, on small synthetic data: a two-point sweep and its report through the CLI (the CI check),
a search, the ledger's recovery of dead trials, and a sweep killed with SIGKILL mid-trial, then restarted."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kmnist import runs
from kmnist.cli import main
from kmnist.sweep import HOST, LOCKS, TRIALS, WORKERS, SweepPlacement, Worker, lock_is_held, try_lock
from kmnist.sweep_spec import build_spec

WITHOUT_EPOCHS = ["--val-size", "100", "--batch-size", "32", "--threads", "1", "--no-progress",
                  "--model-arg", "token_hidden=32", "--model-arg", "channel_hidden=32"]
TINY = [*WITHOUT_EPOCHS, "--epochs", "3"]


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def load_trials(out: Path):
    import optuna

    return optuna.load_study(study_name=out.name, storage=f"sqlite:///{out / 'optuna.db'}").get_trials()


def completed_by_point(trials) -> dict[str, int]:
    from optuna.trial import TrialState

    counts: dict[str, int] = {}
    for trial in trials:
        if trial.state == TrialState.COMPLETE:
            counts[trial.user_attrs["point"]] = counts.get(trial.user_attrs["point"], 0) + 1
    return counts


def test_two_point_sweep_then_report(data_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "lr-sweep"
    command = ["sweep", "--grid", "lr=0.003,0.01", "--data-dir", str(data_dir), "--skip-md5", "--out", str(out), *TINY]
    code, stdout, err = run_cli(command, capsys)
    assert code == 0, err
    assert "2/2 runs complete" in stdout
    names = ["lr=0.003,seed=0", "lr=0.01,seed=0"]
    for name in names:
        run_dir = out / TRIALS / name
        for file in (runs.CONFIG, runs.METRICS, runs.SUMMARY, runs.ENVIRONMENT, runs.BEST, runs.LAST):
            assert (run_dir / file).is_file(), (name, file)
        assert runs.read_json(run_dir / runs.CONFIG)["lr"] == float(name.split(",")[0].split("=")[1])
        assert [row["epoch"] for row in runs.read_metrics(run_dir)] == [1, 2, 3]
    assert completed_by_point(load_trials(out)) == {name: 1 for name in names}

    # The same command again trains nothing: the sweep is complete.
    stamps = {name: (out / TRIALS / name / runs.SUMMARY).stat().st_mtime_ns for name in names}
    code, stdout, err = run_cli(command, capsys)
    assert code == 0, err
    assert "2/2 runs done" in stdout
    assert stamps == {name: (out / TRIALS / name / runs.SUMMARY).stat().st_mtime_ns for name in names}
    assert len(load_trials(out)) == 2

    # Another sweep in the same directory is refused, in one line.
    code, _, err = run_cli([*command[:2], "lr=0.02", *command[3:]], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "holds a different sweep" in err

    code, stdout, err = run_cli(["report", str(out)], capsys)
    assert code == 0, err
    report = out / "report"
    for name in ("results.md", "results.csv", "report.html", "overlay.png", "accuracy_vs_lr.png"):
        assert (report / name).is_file(), name
    assert sorted(p.name for p in (report / "curves").iterdir()) == [f"{name}.png" for name in names]
    with open(report / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(row["lr"]) for row in rows] == [0.003, 0.01] and [row["runs"] for row in rows] == ["1", "1"]
    for row, name in zip(rows, names):
        summary = runs.read_json(out / TRIALS / name / runs.SUMMARY)
        assert float(row["test_acc_at_best_val_mean"]) == pytest.approx(summary["test_acc_at_best_val"], abs=1e-4)
        assert float(row["max_test_acc_mean"]) == pytest.approx(summary["max_test_acc"], abs=1e-4)
    assert "test-selected" in (report / "results.md").read_text() and "| lr=0.003 |" in stdout
    page = (report / "report.html").read_text()
    assert page.count("src='data:image/png;base64,") == 2 + 2  # overlay, accuracy against lr, two runs
    assert not re.findall(r"""(?:src|href)=['"](?!data:)""", page)  # nothing outside the file


def test_random_search_runs_each_point_once_per_seed(data_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "search"
    code, stdout, err = run_cli(["sweep", "--random", "lr=0.001..0.01:log", "--trials", "2", "--seeds", "2",
                                 "--data-dir", str(data_dir), "--skip-md5", "--out", str(out), *TINY,
                                 "--epochs", "1"], capsys)
    assert code == 0, err
    assert "4/4 runs complete" in stdout
    origins = [t for t in load_trials(out) if t.user_attrs.get("origin")]
    assert len(origins) == 2
    assert completed_by_point(load_trials(out)) == {
        f"lr={format(t.params['lr'], '.6g')},seed={seed}": 1 for t in origins for seed in (0, 1)}
    for name in completed_by_point(load_trials(out)):
        lr = float(name.split(",")[0].split("=")[1])
        assert runs.read_json(out / TRIALS / name / runs.CONFIG)["lr"] == pytest.approx(lr, rel=1e-5)


def test_a_search_draws_the_same_points_again_from_the_same_seed() -> None:
    import optuna
    from optuna.distributions import FloatDistribution

    from kmnist.sweep import make_sampler

    def draws(spec) -> list[float]:
        study = optuna.create_study(sampler=make_sampler(spec), direction="maximize")
        values = []
        for _ in range(3):
            trial = study.ask({"lr": FloatDistribution(1e-4, 1e-1, log=True)})
            values.append(trial.params["lr"])
            study.tell(trial, 1.0)
        return values

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for method in ("random", "tpe"):
        spec = build_spec(**{method: ["lr=0.0001..0.1:log"]}, trials=3)
        assert draws(spec) == draws(spec), method
        assert draws(spec) != draws(build_spec(**{method: ["lr=0.0001..0.1:log"]}, trials=3, config={"seed": 5}))


def test_a_continued_search_draws_new_points_not_its_first_ones_again(data_dir: Path, tmp_path: Path, capsys,
                                                                       monkeypatch) -> None:
    import kmnist.runner

    ran = []

    def instant(config, run_dir, *args, **kwargs):  # the search, not the training, is under test
        if len(ran) == stop_after:
            raise KeyboardInterrupt
        ran.append(config.lr)
        return {"best_val_acc": 50.0, "selected_on": "val_acc", "test_acc_at_best_val": 50.0, "max_test_acc": 50.0,
                "final_train_acc": 50.0, "final_test_acc": 50.0}

    monkeypatch.setattr(kmnist.runner, "train_run", instant)
    command = ["sweep", "--random", "lr=0.0001..0.1:log", "--trials", "25", "--data-dir", str(data_dir), "--skip-md5",
               "--out", str(tmp_path / "search"), *TINY, "--epochs", "1"]
    stop_after = 22  # more than the 20 repeated draws after which a search counts as exhausted
    code, _, _ = run_cli(command, capsys)
    assert code == 130 and len(ran) == 22
    stop_after = None
    code, stdout, err = run_cli(command, capsys)
    assert code == 0, err
    assert "25/25 runs complete" in stdout and len(set(ran)) == 25


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # this test asks the study by hand
def test_ledger_reruns_only_dead_trials(tmp_path: Path) -> None:
    """A RUNNING trial whose worker's lock is free is failed and queued again; a live one is left alone."""
    from optuna.trial import TrialState

    spec = build_spec(grid=["lr=0.001,0.002"])
    placement = SweepPlacement(out=tmp_path / "sweep", data_dir=tmp_path)
    placement.out.mkdir()
    worker = Worker(spec, placement)
    live_lock = try_lock(placement.out / WORKERS / "live.lock")
    (placement.out / WORKERS / "dead.lock").touch()  # a worker killed with -9 leaves its file, unlocked
    for worker_id in ("dead", "live"):
        trial = worker.study.ask()
        trial.suggest_categorical("lr", [0.001, 0.002])
        trial.suggest_categorical("seed", [0])
        trial.set_user_attr("point", f"lr={trial.params['lr']},seed=0")
        trial.set_user_attr("worker", {"host": HOST, "id": worker_id})
    ledger = worker.reconcile()
    trials = worker.study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING]
    assert trials[2].params == trials[0].params and trials[2].system_attrs["retry_of"] == 0
    assert trials[2].system_attrs["grid_id"] == trials[0].system_attrs["grid_id"]
    assert ledger.claimable() and not ledger.done()
    worker.reconcile()  # nothing new to do: the point is queued once
    assert len(worker.study.get_trials()) == 3
    live_lock.close()


def test_sigkill_mid_trial_then_restart(data_dir: Path, tmp_path: Path) -> None:
    """kill -9 of a whole 2-worker sweep while one trial runs and the other has finished, then the same command:
    each point ends with exactly one complete result, the finished run is not run again, the cut-off run resumes."""
    out = tmp_path / "killed"
    # The long run must still be going when the short one has ended, figures and all: the short run's end
    # (predictions, its first matplotlib figures) can take as long as 14 tiny epochs on a loaded machine, so the
    # long run has 60.
    command = [sys.executable, "-m", "kmnist", "sweep", "--grid", "epochs=3,60", "--jobs", "2", "--data-dir",
               str(data_dir), "--skip-md5", "--out", str(out), *WITHOUT_EPOCHS, "--batch-size", "16"]
    short, long = "epochs=3,seed=0", "epochs=60,seed=0"
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if (out / TRIALS / short / runs.SUMMARY).is_file() and (out / TRIALS / long / runs.LAST).is_file():
            break
        time.sleep(0.02)
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    os.killpg(process.pid, signal.SIGKILL)  # the sweep and its workers, as a power cut would
    process.wait()
    cut_at = len(runs.read_metrics(out / TRIALS / long)) if (out / TRIALS / long / runs.METRICS).is_file() else 0
    assert (out / TRIALS / short / runs.SUMMARY).is_file() and not (out / TRIALS / long / runs.SUMMARY).is_file(), (
        f"not caught mid-trial: {process.stderr.read().decode()[-2000:]}")
    finished = out / TRIALS / short / runs.SUMMARY
    before = (finished.read_bytes(), finished.stat().st_mtime_ns)
    assert [t.state.name for t in load_trials(out)].count("RUNNING") >= 1  # the kill left a trial running

    restarted = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "2/2 runs complete" in restarted.stdout
    trials = load_trials(out)
    assert completed_by_point(trials) == {short: 1, long: 1}
    assert (finished.read_bytes(), finished.stat().st_mtime_ns) == before  # not run again
    assert [row["epoch"] for row in runs.read_metrics(out / TRIALS / long)] == list(range(1, 61))
    rerun = next(t for t in trials if t.state.name == "COMPLETE" and t.user_attrs["point"] == long)
    assert rerun.user_attrs.get("resumed") == (cut_at > 0 or None)  # it went on from last.pt
    assert not any(t.state.name in ("RUNNING", "WAITING") for t in trials)
    assert (out / LOCKS).is_dir()
    assert not any(lock_is_held(path) for path in (out / WORKERS).iterdir())  # no worker left behind


def test_best_setting_is_the_best_mean_over_seeds_not_the_luckiest_run() -> None:
    from types import SimpleNamespace

    from kmnist.sweep import Ledger, best_setting
    from kmnist.sweep_spec import trial_name

    spec = build_spec(grid=["lr=0.001,0.002"], seeds=3)
    ledger = Ledger(spec)
    scores = {0.001: [99.0, 95.0, 95.0], 0.002: [97.0, 97.0, 97.0]}  # one lucky seed against a steady setting
    for lr, values in scores.items():
        for seed, value in enumerate(values):
            point = {"lr": lr, "seed": seed}
            key = trial_name(spec, point)
            ledger.points[key] = point
            # The test scores rank the other way: the choice must not look at them.
            summary = {"best_val_acc": value, "test_acc_at_best_val": 200 - value, "max_test_acc": 200 - value,
                       "selected_on": "val_acc"}
            ledger.complete[key] = SimpleNamespace(user_attrs={"summary": summary})
    best = best_setting(spec, ledger)
    assert best["point"] == "lr=0.002" and best["runs"] == 3
    assert best["value"] == pytest.approx(97.0) and best["summary"]["test_acc_at_best_val"] == pytest.approx(103.0)


def test_a_point_that_failed_then_completed_is_complete(tmp_path: Path) -> None:
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState, create_trial

    from kmnist.sweep import read_ledger
    from kmnist.sweep_spec import grid_points, trial_name

    spec = build_spec(grid=["lr=0.1,0.2"], config={"epochs": 1})
    first, second = (trial_name(spec, point) for point in grid_points(spec))
    space = {"lr": CategoricalDistribution([0.1, 0.2]), "seed": CategoricalDistribution([0])}

    def trial(state: TrialState, point: str, lr: float, **attrs) -> object:
        return create_trial(state=state, value=90.0 if state == TrialState.COMPLETE else None,
                            params={"lr": lr, "seed": 0}, distributions=space, user_attrs={"point": point, **attrs})

    trials = [trial(TrialState.FAIL, first, 0.1, error="training diverged"),  # then --retry-failed:
              trial(TrialState.COMPLETE, second, 0.2), trial(TrialState.COMPLETE, first, 0.1)]
    ledger = read_ledger(spec, trials, SweepPlacement(out=tmp_path, data_dir=tmp_path))
    assert set(ledger.complete) == {first, second} and not ledger.failed and not ledger.lost


def test_a_full_disk_stops_the_sweep_and_leaves_its_point_to_the_same_command(data_dir: Path, tmp_path: Path,
                                                                              capsys, monkeypatch) -> None:
    import errno

    import kmnist.runner

    out = tmp_path / "sweep"
    command = ["sweep", "--grid", "lr=0.003,0.01", "--data-dir", str(data_dir), "--skip-md5", "--out", str(out),
               *WITHOUT_EPOCHS, "--epochs", "1"]

    def full_disk(config, run_dir, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(run_dir) / runs.LAST))

    monkeypatch.setattr(kmnist.runner, "train_run", full_disk)
    code, _, err = run_cli(command, capsys)
    assert code != 0 and "Traceback" not in err
    assert "last.pt: No space left on device; the sweep stopped, and the same command continues it" in err
    monkeypatch.undo()
    code, stdout, err = run_cli(command, capsys)  # space again: nothing was marked failed
    assert code == 0, err
    assert "2/2 runs complete" in stdout and "failed" not in stdout


def test_a_stop_inside_a_library_leaves_its_point_unfinished_not_failed(data_dir: Path, tmp_path: Path, capsys,
                                                                         monkeypatch) -> None:
    import kmnist.runner

    out = tmp_path / "sweep"
    command = ["sweep", "--grid", "lr=0.003,0.01", "--data-dir", str(data_dir), "--skip-md5", "--out", str(out),
               *WITHOUT_EPOCHS, "--epochs", "1"]

    def cut_off_import(*args, **kwargs):  # Ctrl-C while a library is importing: its own ImportError
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as stop:
            raise ImportError("initialization failed") from stop

    monkeypatch.setattr(kmnist.runner, "train_run", cut_off_import)
    code, _, err = run_cli(command, capsys)
    assert code == 130 and "Traceback" not in err and "interrupted; finished trials are saved" in err
    monkeypatch.undo()
    code, stdout, err = run_cli(command, capsys)  # the same command runs the point: it was not marked failed
    assert code == 0, err
    assert "2/2 runs complete" in stdout and "failed" not in stdout


def test_a_sweep_database_that_cannot_be_written_is_one_line(tmp_path: Path, monkeypatch) -> None:
    import sqlite3

    import optuna
    from sqlalchemy.exc import OperationalError

    from kmnist.errors import KmnistError
    from kmnist.sweep import open_study

    def read_only(**kwargs):
        try:
            try:
                raise sqlite3.OperationalError("attempt to write a readonly database")
            except sqlite3.OperationalError as error:
                raise OperationalError("INSERT INTO studies", {}, error) from error
        except OperationalError as error:
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from error

    monkeypatch.setattr(optuna, "create_study", read_only)
    spec = build_spec(grid=["lr=0.1,0.2"])
    placement = SweepPlacement(out=tmp_path, data_dir=tmp_path)
    with pytest.raises(KmnistError, match="sweep storage sqlite:.*: attempt to write a readonly database; the same "):
        open_study(spec, placement, storage=None)
