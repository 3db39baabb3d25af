"""Sweeps: the ledger that decides which trials to run again."""

from __future__ import annotations

from pathlib import Path

import pytest

from kmnist.sweep import HOST, WORKERS, SweepPlacement, Worker, try_lock
from kmnist.sweep_spec import build_spec


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
