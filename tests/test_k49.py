"""K49 end to end on generated files in the official format: imbalanced classes, scored by balanced accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_dataset
from kmnist import runs
from kmnist.checkpoint import load_checkpoint, model_from_checkpoint
from kmnist.cli import main
from kmnist.config import PRESETS, resolve_config
from kmnist.data import load_dataset
from kmnist.runner import train_run

TINY = ["--epochs", "3", "--val-size", "300", "--batch-size", "64", "--threads", "1", "--no-progress",
        "--model-arg", "token_hidden=32", "--model-arg", "channel_hidden=32", "--lr", "0.01"]


@pytest.fixture(scope="module")
def k49_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), name="k49", fmt="npz", train_count=2000,
                         test_count=600, imbalanced=True)


def test_generated_k49_is_imbalanced(k49_dir: Path) -> None:
    counts = torch.bincount(load_dataset("k49", k49_dir, check_md5=False, download=False).train.labels)
    assert len(counts) == 49 and counts.min() >= 2 and counts.max() > 10 * counts.min()


def test_k49_train_reports_and_selects_on_balanced_accuracy(k49_dir: Path, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    code = main(["train", "--dataset", "k49", "--data-dir", str(k49_dir), "--skip-md5", "--out", str(run_dir),
                 "--class-weighting", *TINY])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "val_bal_acc" in out and "test_bal_acc" in out and "balanced" in out
    history = runs.read_metrics(run_dir)
    summary = runs.read_json(run_dir / runs.SUMMARY)
    assert summary["selected_on"] == "val_bal_acc"
    best = max(history, key=lambda row: (row["val_bal_acc"], -row["epoch"]))
    assert summary["best_epoch"] == best["epoch"] == summary["best_checkpoint_epoch"]
    assert summary["test_bal_acc_at_best_val"] == pytest.approx(best["test_bal_acc"], abs=1e-3)
    assert summary["test_acc_at_best_val"] == pytest.approx(best["test_acc"], abs=1e-3)

    # The saved predictions of best.pt give the same balanced accuracy: the mean of per-class accuracies.
    with np.load(run_dir / runs.PREDICTIONS) as saved:
        predicted = torch.from_numpy(saved["probabilities"].astype("float32")).argmax(dim=1)
        labels = torch.from_numpy(saved["labels"].astype("int64"))
    per_class = torch.stack([(predicted[labels == c] == c).float().mean() for c in labels.unique()])
    assert float(per_class.mean()) * 100 == pytest.approx(summary["test_bal_acc_at_best_val"], abs=0.5)

    code = main(["evaluate", str(run_dir / runs.BEST), "--data-dir", str(k49_dir), "--skip-md5", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["balanced_accuracy"] == pytest.approx(summary["test_bal_acc_at_best_val"], abs=0.5)

    code = main(["report", str(run_dir), "--out", str(tmp_path / "report")])
    capsys.readouterr()
    assert code == 0
    assert "test balanced acc at best val epoch" in (tmp_path / "report" / "results.md").read_text()


def test_k49_without_a_validation_split_is_scored_by_balanced_accuracy(k49_dir: Path, tmp_path: Path, capsys) -> None:
    code = main(["train", "--dataset", "k49", "--data-dir", str(k49_dir), "--skip-md5", "--out", str(tmp_path / "run"),
                 *TINY, "--val-size", "0"])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = runs.read_json(tmp_path / "run" / runs.SUMMARY)
    honest = [line for line in out.splitlines() if "<- the honest estimate" in line]
    assert len(honest) == 1 and "final test balanced accuracy" in honest[0]
    assert f"{summary['final_test_bal_acc']:.2f}%" in honest[0]


def test_both_corrections_of_the_imbalance_at_once_are_warned_of() -> None:
    from kmnist.errors import KmnistWarning
    from kmnist.runner import prepare_run

    both = resolve_config(overrides={"dataset": "k49", "class_weighting": True, "balanced_sampling": True})
    with pytest.warns(KmnistWarning, match="together a class weighs in inverse proportion to its size"):
        prepare_run(both, None, resume=False)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_trains_on_k49(preset: str, k49_dir: Path, tmp_path: Path) -> None:
    """Each preset's model and recipe, cut to one short epoch on 49 imbalanced classes."""
    dataset = load_dataset("k49", k49_dir, check_md5=False, download=False)
    dataset.train.images, dataset.train.labels = dataset.train.images[:600], dataset.train.labels[:600]
    config = resolve_config(preset, {}, {"dataset": "k49", "epochs": 1, "val_size": 100, "threads": 1,
                                         "batch_size": 64, "balanced_sampling": True})
    summary = train_run(config, tmp_path / preset, k49_dir, progress=False, dataset=dataset)
    assert summary["selected_on"] == "val_bal_acc"
    assert 0 <= summary["test_bal_acc_at_best_val"] <= 100
    model = model_from_checkpoint(load_checkpoint(tmp_path / preset / runs.BEST)).eval()
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 49)


def test_resume_describes_the_saved_run_not_the_defaults(k49_dir: Path, tmp_path: Path, capsys) -> None:
    """`--resume RUN` alone: the model, dataset, columns and epochs to go are the saved run's."""
    run_dir = tmp_path / "run"
    config = resolve_config(overrides={"dataset": "k49", "model": "resnet-small",
                                       "model_args": {"width": 4, "depth": 0}, "epochs": 3, "val_size": 300,
                                       "batch_size": 64, "threads": 1})

    def stop_after_first(row: dict) -> None:
        if row["epoch"] == 1:
            raise KeyboardInterrupt  # as Ctrl-C after the first epoch

    with pytest.raises(KeyboardInterrupt):
        train_run(config, run_dir, k49_dir, progress=False, on_epoch=stop_after_first, check_md5=False)
    code = main(["train", "--resume", str(run_dir), "--data-dir", str(k49_dir), "--skip-md5", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "resuming resnet-small on k49" in out and "val_bal_acc" in out
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0] in ("2", "3")]
    assert [row[0] for row in rows] == ["2", "3"] and rows[-1][-1] == "0:00:00"  # nothing left after epoch 3 of 3
    assert runs.read_json(run_dir / runs.SUMMARY)["best_epoch"] in (1, 2, 3)
    environment = runs.read_json(run_dir / runs.ENVIRONMENT)
    assert len(environment["resumed"]) == 1 and environment["resumed"][0]["torch"] == environment["torch"]
    # The same command again may name a model argument at its default; another value is refused.
    same = ["train", "--resume", str(run_dir), "--data-dir", str(k49_dir), "--skip-md5", "--no-progress",
            "--dataset", "k49", "--model", "resnet-small", "--model-arg", "width=4", "--model-arg", "depth=0"]
    assert main([*same, "--model-arg", "dropout=0.0"]) == 0
    assert main([*same, "--model-arg", "dropout=0.1"]) == 2
    assert "--model-args" in capsys.readouterr().err.splitlines()[-1]
