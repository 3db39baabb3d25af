"""benchmarks/fork_run.py: a run's saved state continued under changed settings, as a paired baseline."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

from kmnist import runs
from kmnist.config import TrainConfig
from kmnist.train import fit

from test_train import TINY


def _fork_run():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "fork_run.py"
    spec = importlib.util.spec_from_file_location("fork_run", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_forked_state_continues_as_a_run_with_those_settings_would(tiny_dataset, tmp_path, monkeypatch,
                                                                    capsys) -> None:
    augmented = {**TINY.to_dict(), "translate": 2.0, "rotate": 8.0, "erase": 0.5}
    plain = fit(TrainConfig(**augmented), tiny_dataset)
    state = tmp_path / "after-epoch-2.pt"

    def keep_epoch_2(row: dict) -> None:
        if row["epoch"] == 2:
            shutil.copy(tmp_path / "clean" / runs.LAST, state)

    clean = fit(TrainConfig(**{**augmented, "clean_epochs": 1}), tiny_dataset, tmp_path / "clean", on_epoch=keep_epoch_2)
    assert abs(clean[2]["train_loss"] - plain[2]["train_loss"]) > 1e-3  # the two runs part in epoch 3

    fork_run = _fork_run()
    monkeypatch.setattr(fork_run, "load_dataset", lambda *args, **kwargs: tiny_dataset)
    out = tmp_path / "fork"
    monkeypatch.setattr(sys, "argv", ["fork_run.py", str(state), str(out), "--set", "clean_epochs=0"])
    fork_run.main()
    forked = runs.read_metrics(out)
    assert [row["epoch"] for row in forked] == [1, 2, 3]
    for name in ("train_loss", "val_acc", "test_acc"):  # epoch 3 of the plain run, not of the clean one
        assert forked[2][name] == pytest.approx(plain[2][name], abs=1e-4)
    assert runs.read_json(out / runs.CONFIG)["clean_epochs"] == 0  # OUT records what it ran
    assert (out / runs.ENVIRONMENT).is_file() and (out / runs.BEST).is_file()
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split()[:2] == ["epoch", "train_loss"] and printed[1].split()[0] == "3"


def test_fork_run_refuses_an_existing_folder_and_a_best_checkpoint(tiny_checkpoint, tmp_path, monkeypatch) -> None:
    fork_run = _fork_run()
    monkeypatch.setattr(sys, "argv", ["fork_run.py", str(tiny_checkpoint), str(tmp_path / "new")])
    with pytest.raises(SystemExit, match="holds no training state"):
        fork_run.main()
    assert not (tmp_path / "new").exists()
