"""Knowledge distillation (--teacher): the teacher's term, its normalisation, and that it steers training."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kmnist import runs
from kmnist.checkpoint import load_checkpoint, model_from_checkpoint
from kmnist.config import TrainConfig
from kmnist.errors import KmnistError, KmnistWarning
from kmnist.runner import train_run
from kmnist.train import Teacher, Trainer, check_teacher, fit
from test_train import GRAPHED_TOLERANCE, TINY


@pytest.fixture
def teacher_path(tmp_path: Path, tiny_dataset) -> Path:
    fit(TINY, tiny_dataset, tmp_path / "teacher")
    return tmp_path / "teacher" / runs.BEST


def _with(config: TrainConfig, **changes) -> TrainConfig:
    return TrainConfig(**{**config.to_dict(), **changes})


def _permuted_teacher(teacher_path: Path, folder: Path) -> tuple[Path, torch.Tensor]:
    """The teacher with its output classes relabelled: it answers permutation[c] where it answered c."""
    payload = load_checkpoint(teacher_path)
    permutation = torch.roll(torch.arange(len(payload["class_names"])), 3)
    state = payload["state_dict"]
    inverse = torch.argsort(permutation)
    state["head.weight"], state["head.bias"] = state["head.weight"][inverse], state["head.bias"][inverse]
    path = folder / "permuted.pt"
    torch.save(payload, path)
    return path, permutation


def test_the_teacher_term_is_hard_label_cross_entropy_or_softened_kl(teacher_path: Path, tiny_dataset) -> None:
    trainer = Trainer(_with(TINY, teacher=str(teacher_path)), tiny_dataset)
    images, labels = trainer.first_batch(64)
    target = trainer.teacher.logits(images)
    logits = torch.randn(64, 10)
    hard = trainer.teacher.loss(logits, images)
    assert torch.allclose(hard, F.cross_entropy(logits, target.argmax(dim=1)))
    soft = Teacher(_with(TINY, teacher=str(teacher_path), distill_temperature=4.0), "kmnist",
                   tiny_dataset.class_names, trainer.normalization, trainer.device)
    expected = (F.softmax(target / 4, dim=1) * (F.log_softmax(target / 4, dim=1)
                                                - F.log_softmax(logits / 4, dim=1))).sum(dim=1).mean() * 16
    assert torch.allclose(soft.loss(logits, images), expected, atol=1e-6)
    assert float(soft.loss(target, images)) == pytest.approx(0.0, abs=1e-6)  # a student that agrees learns nothing


def test_the_teacher_sees_images_in_its_own_normalisation(teacher_path: Path, tiny_dataset) -> None:
    payload = load_checkpoint(teacher_path)
    own = payload["normalization"]
    other = {"mean": own["mean"] + 0.2, "std": own["std"] * 1.5}
    teacher = Teacher(_with(TINY, teacher=str(teacher_path)), "kmnist", tiny_dataset.class_names, other,
                      torch.device("cpu"))
    raw = tiny_dataset.train.images[:50].unsqueeze(1).float() / 255
    model = model_from_checkpoint(payload)
    with torch.no_grad():
        expected = model((raw - own["mean"]) / own["std"])
    assert torch.allclose(teacher.logits((raw - other["mean"]) / other["std"]), expected, atol=1e-5)


def test_a_student_learns_what_the_teacher_answers_not_the_labels(teacher_path: Path, tiny_dataset,
                                                                  tmp_path: Path) -> None:
    permuted, permutation = _permuted_teacher(teacher_path, tmp_path)
    config = _with(TINY, teacher=str(permuted), distill_weight=1.0, seed=1, epochs=4)
    fit(config, tiny_dataset, tmp_path / "student")
    student = model_from_checkpoint(load_checkpoint(tmp_path / "student" / runs.LAST))
    payload = load_checkpoint(tmp_path / "student" / runs.LAST)
    images = (tiny_dataset.test.images.unsqueeze(1).float() / 255 - payload["normalization"]["mean"]) / \
        payload["normalization"]["std"]
    with torch.no_grad():
        predicted = student(images).argmax(dim=1)
    labels = tiny_dataset.test.labels
    assert (predicted == permutation[labels]).float().mean() > 0.5  # the teacher's relabelled classes
    assert (predicted == labels).float().mean() < 0.2


def test_a_teacher_of_another_dataset_or_no_checkpoint_is_one_line(teacher_path: Path, tiny_dataset,
                                                                   tmp_path: Path) -> None:
    with pytest.raises(KmnistError, match="checkpoint not found"):
        Trainer(_with(TINY, teacher=str(tmp_path / "missing.pt")), tiny_dataset)
    payload = load_checkpoint(teacher_path)
    payload["dataset"] = "k49"
    torch.save(payload, tmp_path / "k49.pt")
    with pytest.raises(KmnistError, match="trained on k49"):
        Trainer(_with(TINY, teacher=str(tmp_path / "k49.pt")), tiny_dataset)
    with pytest.raises(KmnistError, match="distill_weight"):
        _with(TINY, distill_weight=1.5)


def test_train_warns_when_the_teacher_had_another_validation_split(teacher_path: Path, data_dir: Path,
                                                                    tmp_path: Path) -> None:
    command = [sys.executable, "-m", "kmnist", "train", "--data-dir", str(data_dir), "--skip-md5", "--no-progress",
               "--epochs", "1", "--val-size", "100", "--model-arg", "token_hidden=16", "--model-arg",
               "channel_hidden=16", "--threads", "1", "--teacher", str(teacher_path)]
    same = subprocess.run(command + ["--seed", "0", "--out", str(tmp_path / "a")], capture_output=True, text=True)
    assert same.returncode == 0, same.stderr
    assert "warning" not in same.stderr
    other = subprocess.run(command + ["--seed", "5", "--out", str(tmp_path / "b")], capture_output=True, text=True)
    assert other.returncode == 0, other.stderr
    assert "trained without this run's validation split" in other.stderr
    missing = subprocess.run(command[:-1] + [str(tmp_path / "none.pt")], capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "checkpoint not found" in missing.stderr


def test_the_graphed_step_distils_as_the_eager_loop_does(teacher_path: Path, tiny_dataset, monkeypatch) -> None:
    # --compile cuda-graph records Trainer.train_step, teacher included; run uncaptured on a CPU it must
    # give the eager loop's numbers.
    from kmnist.graphed import GraphedStep

    config = _with(TINY, teacher=str(teacher_path), distill_temperature=2.0, epochs=2, seed=3)
    eager = fit(config, tiny_dataset)

    def warm_up(trainer: Trainer) -> float:
        trainer.graphed = GraphedStep(trainer, trainer.config.batch_size, capture=False)
        return 0.0

    monkeypatch.setattr(Trainer, "warm_up", warm_up)
    graphed = fit(config, tiny_dataset)
    for got, expected in zip(graphed, eager):
        for key in ("train_loss", "val_acc", "test_loss"):
            assert got[key] == pytest.approx(expected[key], rel=GRAPHED_TOLERANCE, abs=1e-6), key


def test_every_run_checks_its_teacher_before_writing_anything(teacher_path: Path, data_dir: Path,
                                                              tmp_path: Path) -> None:
    # train_run is what `kmnist train` and every sweep trial go through: a teacher that cannot serve fails there,
    # leaving no run folder, and one trained on another validation split is warned about.
    with pytest.raises(KmnistError, match="checkpoint not found"):
        train_run(_with(TINY, teacher=str(tmp_path / "missing.pt")), tmp_path / "a", data_dir, check_md5=False)
    with pytest.raises(KmnistError, match="trained on kmnist; this run trains on k49"):
        train_run(_with(TINY, dataset="k49", teacher=str(teacher_path)), tmp_path / "b", data_dir, check_md5=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.warns(KmnistWarning, match="without this run's validation split"):
        check_teacher(_with(TINY, teacher=str(teacher_path), seed=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the teacher's own split: nothing to warn about
        check_teacher(_with(TINY, teacher=str(teacher_path)))


def test_a_resumed_run_whose_teacher_is_gone_fails_before_any_work(teacher_path: Path, data_dir: Path,
                                                                    tmp_path: Path, capsys) -> None:
    from kmnist.cli import main

    moved = tmp_path / "teacher.pt"
    moved.write_bytes(teacher_path.read_bytes())
    run_dir = tmp_path / "run"
    code = main(["train", "--teacher", str(moved), "--data-dir", str(data_dir), "--skip-md5", "--epochs", "1",
                 "--val-size", "100", "--batch-size", "32", "--threads", "1", "--no-progress", "--out", str(run_dir)])
    assert code == 0, capsys.readouterr().err
    moved.unlink()
    stamp = (run_dir / runs.LAST).stat().st_mtime_ns
    code = main(["train", "--resume", str(run_dir), "--data-dir", str(data_dir), "--skip-md5", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 2 and "checkpoint not found" in err and "resuming" not in out  # before the banner
    assert (run_dir / runs.LAST).stat().st_mtime_ns == stamp


def test_a_relative_teacher_path_is_saved_whole_and_found_on_resume_from_elsewhere(
        teacher_path: Path, data_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    from kmnist.cli import main

    monkeypatch.chdir(teacher_path.parent)
    run_dir = tmp_path / "run"
    base = ["--data-dir", str(data_dir), "--skip-md5", "--val-size", "100", "--batch-size", "32", "--threads", "1",
            "--no-progress"]
    code = main(["train", "--teacher", teacher_path.name, *base, "--epochs", "2", "--out", str(run_dir)])
    assert code == 0, capsys.readouterr().err
    assert runs.read_json(run_dir / runs.CONFIG)["teacher"] == str(teacher_path)
    (run_dir / runs.SUMMARY).unlink()  # as if cut off after its last epoch
    code = main(["train", "--teacher", teacher_path.name, "--resume", str(run_dir), *base])  # the same command again
    assert code == 0, capsys.readouterr().err
    (run_dir / runs.SUMMARY).unlink()
    monkeypatch.chdir(tmp_path)  # elsewhere: the saved path still finds the teacher
    code = main(["train", "--resume", str(run_dir), *base])
    assert code == 0, capsys.readouterr().err
