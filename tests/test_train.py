"""The training loop: a tiny real fit, checkpoint round trip, resume after interruption, divergence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kmnist import runs
from kmnist.checkpoint import load_checkpoint, model_from_checkpoint
from kmnist.config import TrainConfig
from kmnist.data import normalize
from kmnist.errors import KmnistError, TrainingDiverged
from kmnist.metrics import cross_entropy, predict_logits
from kmnist.train import fit, lr_factor

# fp32: these tests compare two computations of the same numbers closely, and "auto" would be bf16 autocast on
# CPUs with AVX512-BF16 or AMX, where the two round differently.
TINY = TrainConfig(epochs=3, val_size=100, batch_size=32, lr=3e-3, threads=1, precision="fp32",
                   model_args={"token_hidden": 64, "channel_hidden": 64})


def _stop_after_first(row: dict) -> None:
    """An on_epoch callback: Ctrl-C once the first epoch's files are written."""
    if row["epoch"] == 1:
        raise KeyboardInterrupt


def _drop_times(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.endswith("seconds")} for row in history]


def test_tiny_fit_learns(tiny_dataset, tmp_path: Path) -> None:
    history = fit(TINY, tiny_dataset, tmp_path)
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert max(row["val_acc"] for row in history) > 50  # chance is 10%
    assert runs.read_metrics(tmp_path)[-1]["epoch"] == 3
    for name in (runs.LAST, runs.BEST):
        assert (tmp_path / name).is_file()


def test_each_step_is_told_with_the_running_loss_now_and_then(tiny_dataset, monkeypatch) -> None:
    monkeypatch.setattr("kmnist.train.LOSS_EVERY", 3)
    events = []
    history = fit(TrainConfig(**{**TINY.to_dict(), "epochs": 2}), tiny_dataset, on_step=events.append)
    steps = events[0].steps
    assert steps > 3 and all(event.steps == steps for event in events)
    assert [(event.epoch, event.step) for event in events] == [(e, s) for e in (1, 2) for s in range(1, steps + 1)]
    assert [event.step for event in events if event.loss is not None] == [s for s in range(3, steps + 1, 3)] * 2
    assert all(0 < event.loss < 5 for event in events if event.loss is not None)
    assert history[0]["train_loss"] < 5


def test_same_seed_same_result(tiny_dataset) -> None:
    config = TrainConfig(**{**TINY.to_dict(), "epochs": 1})
    first = fit(config, tiny_dataset)
    second = fit(config, tiny_dataset)
    assert _drop_times(first) == _drop_times(second)


def test_checkpoint_round_trip_gives_identical_logits(tiny_dataset, tmp_path: Path) -> None:
    history = fit(TINY, tiny_dataset, tmp_path)
    payload = load_checkpoint(tmp_path / runs.LAST)
    assert payload["model"] == "report-mixer" and payload["class_names"][0] == "お"
    assert payload["model_args"]["token_hidden"] == 64 and payload["epoch"] == 3
    model = model_from_checkpoint(payload)
    again = model_from_checkpoint(load_checkpoint(tmp_path / runs.LAST))
    images = normalize(tiny_dataset.test.images[:50], **payload["normalization"])
    with torch.no_grad():
        assert torch.equal(model(images), again(images))
    # The loaded weights are the trained ones: they give the test loss the trainer measured, to the last bit.
    logits = predict_logits(model, tiny_dataset.test.images, batch_size=TINY.eval_batch_size, precision="fp32",
                            **payload["normalization"])
    assert cross_entropy(logits, tiny_dataset.test.labels) == history[-1]["test_loss"]


def test_checkpoint_loading_refuses_other_files(tmp_path: Path) -> None:
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(3)}, plain)
    with pytest.raises(KmnistError, match="not a kmnist checkpoint"):
        load_checkpoint(plain)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x04not a checkpoint")
    with pytest.raises(KmnistError, match="not a readable.*another kind of file, or cut short"):
        load_checkpoint(garbage)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(plain.read_bytes()[:-100])  # an interrupted copy of a checkpoint
    with pytest.raises(KmnistError, match="not a readable.*another kind of file, or cut short"):
        load_checkpoint(cut)


class _Shell:  # what an attacker's pickle would build: refused by the weights-only unpickler
    def __reduce__(self):
        import os
        return (os.system, ("true",))


def test_checkpoint_damaged_or_edited_inside_is_refused(tiny_dataset, tmp_path: Path) -> None:
    import zipfile

    fit(TrainConfig(**{**TINY.to_dict(), "epochs": 1}), tiny_dataset, tmp_path)
    good = tmp_path / runs.BEST
    damaged = tmp_path / "damaged.pt"  # a whole zip whose pickle is broken
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(damaged, "w") as target:
        for item in source.infolist():
            target.writestr(item, b"\x80\x02a." if item.filename.endswith("data.pkl") else source.read(item))
    with pytest.raises(KmnistError, match="not a readable kmnist checkpoint"):
        load_checkpoint(damaged)
    payload = load_checkpoint(good)
    for name, value in (("format_version", "2"), ("model_args", [1, 2]), ("state_dict", [1, 2]),
                        ("num_classes", "10"), ("model", ["x"]), ("class_names", None)):
        torch.save({**payload, name: value}, tmp_path / "edited.pt")
        with pytest.raises(KmnistError, match=name):
            load_checkpoint(tmp_path / "edited.pt")
    torch.save({"format": payload["format"], "x": _Shell()}, tmp_path / "evil.pt")
    with pytest.raises(KmnistError, match="(?i)unsupported global.*system"):  # what was refused, named
        load_checkpoint(tmp_path / "evil.pt")


def test_checkpoint_of_another_model_is_refused(tiny_dataset, tmp_path: Path) -> None:
    fit(TrainConfig(**{**TINY.to_dict(), "epochs": 1}), tiny_dataset, tmp_path)
    payload = load_checkpoint(tmp_path / runs.BEST)
    with pytest.raises(KmnistError, match="holds model"):
        model_from_checkpoint(payload, expected_model="some-other-model")
    payload["model_args"]["channels"] = 32  # weights of a 16-channel model, asked to fit a 32-channel one
    with pytest.raises(KmnistError, match="do not fit"):
        model_from_checkpoint(payload)


# Resumed runs must draw every random number as the uninterrupted one: dropout and drop-path use torch's global
# generator (restored from last.pt), and a scheduler's state matters from the first epoch only when it acts at once.
RESUMED = {
    "report-mixer, plateau": TINY,
    "report-mixer, plateau acting every epoch, dropout": TrainConfig(**{
        **TINY.to_dict(), "plateau_patience": 0, "model_args": {**TINY.model_args, "dropout": 0.2}}),
    "mixer with drop-path, cosine": TrainConfig(**{
        **TINY.to_dict(), "model": "mixer", "scheduler": "cosine", "warmup_epochs": 1.0,
        "model_args": {"dim": 32, "depth": 2, "token_hidden": 32, "channel_hidden": 64, "dropout": 0.1,
                       "drop_path": 0.2}}),
}


def test_a_summary_takes_its_result_from_the_epoch_best_on_validation_never_test() -> None:
    row = lambda epoch, val, test: {"epoch": epoch, "train_loss": 1.0, "train_acc": 90.0, "val_acc": val,  # noqa: E731
                                    "val_bal_acc": 100 - val, "test_acc": test, "test_bal_acc": test - 1,
                                    "epoch_seconds": 1.0}
    history = [row(1, 80.0, 70.0), row(2, 90.0, 75.0), row(3, 85.0, 95.0), row(4, 90.0, 60.0)]
    summary = runs.summarize(history)
    assert (summary["best_epoch"], summary["test_acc_at_best_val"], summary["best_val_acc"]) == (2, 75.0, 90.0)
    assert (summary["max_test_epoch"], summary["max_test_acc"], summary["final_test_acc"]) == (3, 95.0, 60.0)
    balanced = runs.summarize(history, select_on="val_bal_acc")  # K49: the best balanced validation epoch (1)
    assert (balanced["best_epoch"], balanced["test_acc_at_best_val"], balanced["test_bal_acc_at_best_val"]) == (1, 70.0, 69.0)


def test_best_pt_holds_the_epoch_best_on_validation_never_test(tiny_dataset, tmp_path: Path, monkeypatch) -> None:
    import kmnist.train

    scores = {"val": iter([50.0, 70.0, 60.0]), "test": iter([90.0, 40.0, 80.0])}  # test's best is epoch 1

    def scripted(self, split):
        if not len(split):
            return float("nan"), float("nan"), float("nan")
        score = next(scores["val" if split is self.val else "test"])
        return 1.0, score, score

    monkeypatch.setattr(kmnist.train.Trainer, "evaluate", scripted)
    history = fit(TINY, tiny_dataset, tmp_path)
    assert [row["val_acc"] for row in history] == [50.0, 70.0, 60.0]
    assert load_checkpoint(tmp_path / runs.BEST)["epoch"] == 2


@pytest.mark.parametrize("config", RESUMED.values(), ids=RESUMED.keys())
def test_resume_after_interruption_matches_uninterrupted(config: TrainConfig, tiny_dataset, tmp_path: Path) -> None:
    whole = fit(config, tiny_dataset, tmp_path / "whole")

    with pytest.raises(KeyboardInterrupt):
        fit(config, tiny_dataset, tmp_path / "cut", on_epoch=_stop_after_first)
    assert runs.read_metrics(tmp_path / "cut")[-1]["epoch"] == 1
    resumed = fit(config, tiny_dataset, tmp_path / "cut", resume=True)
    assert _drop_times(resumed) == _drop_times(whole)
    final_whole = load_checkpoint(tmp_path / "whole" / runs.LAST)["state_dict"]
    final_cut = load_checkpoint(tmp_path / "cut" / runs.LAST)["state_dict"]
    assert all(torch.equal(final_whole[k], final_cut[k]) for k in final_whole)
    # The best validation score is recovered from the history: best.pt is the same epoch's.
    assert load_checkpoint(tmp_path / "whole" / runs.BEST)["epoch"] == load_checkpoint(tmp_path / "cut" / runs.BEST)["epoch"]


def test_ctrl_c_while_an_epoch_is_saved_waits_until_its_checkpoint_and_metrics_agree(tiny_dataset, tmp_path: Path,
                                                                                     monkeypatch) -> None:
    import signal

    import kmnist.train

    save = kmnist.train.atomic_torch_save

    def interrupted_save(payload, path) -> None:
        if Path(path).name == runs.LAST:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C in the middle of writing epoch 1's files
        save(payload, path)

    monkeypatch.setattr(kmnist.train, "atomic_torch_save", interrupted_save)
    # A background job (`nohup make test &`) inherits SIGINT ignored, and then Ctrl-C cannot be simulated.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        fit(TINY, tiny_dataset, tmp_path)
    assert load_checkpoint(tmp_path / runs.LAST)["epoch"] == 1
    assert [row["epoch"] for row in runs.read_metrics(tmp_path)] == [1]
    assert signal.getsignal(signal.SIGINT) is handler
    signal.signal(signal.SIGINT, previous)


def test_a_run_stopped_between_its_last_checkpoint_and_metrics_gets_every_row_on_resume(tiny_dataset,
                                                                                       tmp_path: Path) -> None:
    # A kill after the final epoch's last.pt was written and before metrics.csv was: no epoch is left to
    # train on resume, and the file must still end with that epoch (the checkpoint's history holds it).
    fit(TINY, tiny_dataset, tmp_path)
    whole = runs.read_metrics(tmp_path)
    runs.write_metrics(tmp_path, whole[:-1])
    resumed = fit(TINY, tiny_dataset, tmp_path, resume=True)
    assert [row["epoch"] for row in resumed] == [1, 2, 3]
    assert [row["epoch"] for row in runs.read_metrics(tmp_path)] == [1, 2, 3]
    assert runs.read_metrics(tmp_path)[-1]["val_acc"] == whole[-1]["val_acc"]


class _Killed(BaseException):
    """What kill -9 does to a process: nothing after it runs (not deferred like Ctrl-C, not an Exception)."""


@pytest.mark.parametrize("killed_before", [runs.LAST, runs.METRICS])
def test_a_kill_between_an_epochs_files_never_leaves_a_best_pt_of_an_epoch_trained_again(
        killed_before: str, tiny_dataset, tmp_path: Path, monkeypatch) -> None:
    import kmnist.train

    whole = fit(TINY, tiny_dataset, tmp_path / "whole")
    save, write_metrics = kmnist.train.atomic_torch_save, runs.write_metrics

    def kill_in_epoch_2(name, epoch, action):
        if name == killed_before and epoch == 2:
            raise _Killed
        action()

    monkeypatch.setattr(kmnist.train, "atomic_torch_save", lambda payload, path: kill_in_epoch_2(
        Path(path).name, payload["epoch"], lambda: save(payload, path)))
    monkeypatch.setattr(runs, "write_metrics", lambda run_dir, rows: kill_in_epoch_2(
        runs.METRICS, len(rows), lambda: write_metrics(run_dir, rows)))
    with pytest.raises(_Killed):
        fit(TINY, tiny_dataset, tmp_path / "cut")
    monkeypatch.undo()
    # Epoch 2's best waits beside best.pt, which still holds epoch 1 (epoch 2 improved on validation).
    assert whole[1]["val_acc"] > whole[0]["val_acc"]
    assert load_checkpoint(tmp_path / "cut" / runs.BEST)["epoch"] == 1
    assert (tmp_path / "cut" / runs.BEST_PENDING).is_file()
    finished = load_checkpoint(tmp_path / "cut" / runs.LAST)["epoch"]
    assert finished == (1 if killed_before == runs.LAST else 2)
    resumed = fit(TINY, tiny_dataset, tmp_path / "cut", resume=True)
    assert _drop_times(resumed) == _drop_times(whole) and not (tmp_path / "cut" / runs.BEST_PENDING).exists()
    assert load_checkpoint(tmp_path / "cut" / runs.BEST)["epoch"] == load_checkpoint(tmp_path / "whole" / runs.BEST)["epoch"]


def test_a_run_saved_before_a_config_field_existed_resumes(tiny_dataset, tmp_path: Path) -> None:
    # A field added later (here the distillation ones) is missing from older checkpoints; its default is
    # what such a run computed, so the run continues.
    with pytest.raises(KeyboardInterrupt):
        fit(TINY, tiny_dataset, tmp_path, on_epoch=_stop_after_first)
    payload = load_checkpoint(tmp_path / runs.LAST)
    for name in ("teacher", "distill_weight", "distill_temperature"):
        del payload["config"][name]
    torch.save(payload, tmp_path / runs.LAST)
    assert [row["epoch"] for row in fit(TINY, tiny_dataset, tmp_path, resume=True)] == [1, 2, 3]


def test_resume_refuses_a_different_configuration(tiny_dataset, tmp_path: Path) -> None:
    fit(TrainConfig(**{**TINY.to_dict(), "epochs": 1}), tiny_dataset, tmp_path)
    with pytest.raises(KmnistError, match="different configuration"):
        fit(TrainConfig(**{**TINY.to_dict(), "epochs": 2, "lr": 0.1}), tiny_dataset, tmp_path, resume=True)


def test_divergence_stops_with_advice_and_keeps_last_good_checkpoint(tiny_dataset, tmp_path: Path) -> None:
    config = TrainConfig(**{**TINY.to_dict(), "epochs": 1})
    fit(config, tiny_dataset, tmp_path)
    good = load_checkpoint(tmp_path / runs.LAST)["state_dict"]
    diverging = TrainConfig(**{**TINY.to_dict(), "epochs": 3, "lr": 1e25})
    with pytest.raises(TrainingDiverged, match="lower learning rate"):
        fit(diverging, tiny_dataset, tmp_path / "bad")
    assert not (tmp_path / "bad" / runs.LAST).exists()
    kept = load_checkpoint(tmp_path / runs.LAST)["state_dict"]
    assert all(torch.equal(good[k], kept[k]) for k in good)


@pytest.mark.parametrize("scheduler", ["cosine", "onecycle", "none"])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_schedules_and_optimizers_train(tiny_dataset, scheduler: str, optimizer: str) -> None:
    config = TrainConfig(**{**TINY.to_dict(), "epochs": 2, "scheduler": scheduler, "optimizer": optimizer,
                            "lr": 0.05 if optimizer == "sgd" else 3e-3, "warmup_epochs": 0.5})
    history = fit(config, tiny_dataset)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    if scheduler in ("cosine", "onecycle"):
        assert history[-1]["lr"] < 0.1 * config.lr  # the last step's rate, annealed nearly to zero


@pytest.mark.parametrize("scheduler", ["cosine", "onecycle"])
@pytest.mark.parametrize("warmup_epochs", [0.001, 0.3, 1.0, 0.0])
def test_the_warm_up_rises_to_the_peak_and_never_past_it(scheduler: str, warmup_epochs: float) -> None:
    config = TrainConfig(**{**TINY.to_dict(), "epochs": 3, "scheduler": scheduler, "warmup_epochs": warmup_epochs})
    steps_per_epoch = 7  # so that the fractional warm-ups end between two steps
    factors = [lr_factor(config, step, 3 * steps_per_epoch, steps_per_epoch) for step in range(3 * steps_per_epoch)]
    assert max(factors) == 1.0  # the peak lr is reached, and not exceeded (a warm-up shorter than a step was 2.1x)
    peak = factors.index(1.0)
    assert factors[:peak + 1] == sorted(factors[:peak + 1]) and factors[peak:] == sorted(factors[peak:], reverse=True)


def test_no_validation_split(tiny_dataset, tmp_path: Path) -> None:
    config = TrainConfig(**{**TINY.to_dict(), "epochs": 1, "val_size": 0})
    history = fit(config, tiny_dataset, tmp_path)
    summary = runs.summarize(history)
    assert summary["best_val_acc"] is None and (tmp_path / runs.BEST).is_file()


def test_allocator_setting_is_applied_once_and_harmless() -> None:
    from kmnist.cpu import keep_freed_memory

    first = keep_freed_memory()
    assert keep_freed_memory() == first
    assert torch.ones(3).sum() == 3


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_training_computes_what_eager_training_does(tiny_dataset, tmp_path: Path, precision: str) -> None:
    # torch.compile (inductor on the CPU) fuses ops, so the fp32 sums may differ in the last bits, not more;
    # in bf16 it rounds at other places than eager autocast does. (Its backward of a bf16 amax once gave
    # NaN gradients from the first step: the small ResNet pools in fp32.)
    config = TrainConfig(**{**TINY.to_dict(), "epochs": 1, "val_size": 120, "model": "resnet-small",
                            "model_args": {"width": 4, "depth": 0}, "translate": 1.0, "precision": precision})
    eager = fit(config, tiny_dataset)
    compiled = fit(TrainConfig(**{**config.to_dict(), "compile": "default"}), tiny_dataset, tmp_path)
    assert eager[0]["compile_seconds"] == 0 and compiled[0]["compile_seconds"] > 0
    tolerance = 1e-3 if precision == "fp32" else 3e-2
    assert compiled[0]["train_loss"] == pytest.approx(eager[0]["train_loss"], rel=tolerance)
    assert compiled[0]["val_loss"] == pytest.approx(eager[0]["val_loss"], rel=tolerance)  # BatchNorm statistics too
    # The checkpoint holds the plain module's weights, loadable without compiling anything.
    payload = load_checkpoint(tmp_path / runs.LAST)
    assert not any(key.startswith("_orig_mod") for key in payload["state_dict"])
    assert runs.summarize(compiled)["compile_seconds"] == compiled[0]["compile_seconds"]


# The report's model (Adam, plateau) and a small ResNet (Nesterov SGD, one-cycle, augmentation, weight average).
GRAPHED_CONFIGS = {
    "report-mixer": {},
    "resnet-small": {"model": "resnet-small", "model_args": {"width": 4, "depth": 1}, "optimizer": "sgd", "lr": 0.1,
                     "scheduler": "onecycle", "translate": 1.0, "erase": 0.5, "label_smoothing": 0.1, "ema": 0.9},
}


def _graph_without_capture(monkeypatch) -> None:
    """--compile cuda-graph's step, run uncaptured: training goes through kmnist.graphed.GraphedStep on a CPU."""
    from kmnist.graphed import GraphedStep
    from kmnist.train import Trainer

    def warm_up(trainer: Trainer) -> float:
        trainer.graphed = GraphedStep(trainer, trainer.config.batch_size, capture=False)
        return 0.0

    monkeypatch.setattr(Trainer, "warm_up", warm_up)


# The step's learning rates are tensors, rounded unlike Python floats in the last bit; over two epochs that grows
# to about 1e-4 (1.3e-4 measured on an AVX-512 CPU). A real difference in what is trained moves the losses by far
# more: the warm-up steps left in, or a learning rate 1% off, by 20% or more.
GRAPHED_TOLERANCE = 1e-3


def _assert_same_epochs(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for row_got, row_expected in zip(got, expected):
        for key in ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "lr"):
            assert row_got[key] == pytest.approx(row_expected[key], rel=GRAPHED_TOLERANCE, abs=1e-6), key


@pytest.mark.parametrize("name", list(GRAPHED_CONFIGS))
def test_the_graphed_step_trains_what_the_eager_loop_does(tiny_dataset, monkeypatch, name: str) -> None:
    # --compile cuda-graph replays GraphedStep on fixed buffers; run uncaptured here, the same function must
    # give the eager loop's numbers: its warm-up steps undone (weights, BatchNorm statistics, optimiser
    # moments and step counts), learning rates followed as tensors, the last, shorter batch eager.
    config = TrainConfig(**{**TINY.to_dict(), "epochs": 2, **GRAPHED_CONFIGS[name]})  # 500 images: 15 x 32 + 20
    eager = fit(config, tiny_dataset)
    _graph_without_capture(monkeypatch)
    _assert_same_epochs(fit(config, tiny_dataset), eager)


@pytest.mark.parametrize("name", list(GRAPHED_CONFIGS))
def test_a_graphed_run_resumed_from_an_eager_checkpoint_continues_it(tiny_dataset, tmp_path: Path, monkeypatch,
                                                                     name: str) -> None:
    # The warm-up puts back the optimiser state a resumed run already has (momentum, Adam's moments, step count).
    config = TrainConfig(**{**TINY.to_dict(), "epochs": 2, **GRAPHED_CONFIGS[name]})
    whole = fit(config, tiny_dataset)

    with pytest.raises(KeyboardInterrupt):
        fit(config, tiny_dataset, tmp_path, on_epoch=_stop_after_first)
    _graph_without_capture(monkeypatch)
    _assert_same_epochs(fit(config, tiny_dataset, tmp_path, resume=True), whole)


@pytest.mark.parametrize("mode", ["cuda-graph", "cuda-graph-compiled"])
def test_cuda_graph_modes_refuse_a_cpu_and_mixed_batches(tiny_dataset, mode: str) -> None:
    with pytest.raises(KmnistError, match=f"--compile {mode} needs a CUDA device"):
        fit(TrainConfig(**{**TINY.to_dict(), "compile": mode, "device": "cpu"}), tiny_dataset)
    with pytest.raises(KmnistError, match="mixup/cutmix"):
        TrainConfig(compile=mode, mixup=0.2)


def test_the_graph_around_a_compiled_model_trains_what_the_eager_loop_does(tiny_dataset, monkeypatch) -> None:
    # --compile cuda-graph-compiled: the real warm-up path (torch.compile's inductor on the CPU, compiled during
    # the graph's warm-up steps, which are undone), with only the capture left out, as a CPU has no CUDA graphs.
    import functools

    from kmnist import graphed, train

    config = TrainConfig(**{**TINY.to_dict(), "epochs": 1})
    eager = fit(config, tiny_dataset)
    monkeypatch.setattr(train, "training_device", lambda config: torch.device("cpu"))
    monkeypatch.setattr(train, "GraphedStep", functools.partial(graphed.GraphedStep, capture=False))
    compiled = []  # the modes torch.compile was asked for
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **options: compiled.append(options) or real_compile(
        model, **options))
    got = fit(TrainConfig(**{**config.to_dict(), "compile": "cuda-graph-compiled"}), tiny_dataset)
    assert compiled == [{"mode": None, "dynamic": False}]  # the default mode: fused kernels, no CUDA graphs of its own
    _assert_same_epochs(got, eager)


def test_summary_is_written_last_so_a_run_cut_off_in_its_figures_is_not_finished(tiny_dataset, tmp_path: Path,
                                                                                   monkeypatch) -> None:
    """A sweep counts a run with summary.json as finished: every other file must be there by then."""
    from kmnist import plots
    from kmnist.runner import train_run

    run_dir = tmp_path / "run"
    config = TrainConfig(**{**TINY.to_dict(), "epochs": 1})
    drawn = plots.confident_mistakes

    def cut_off(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while the last figure is drawn

    monkeypatch.setattr(plots, "confident_mistakes", cut_off)
    with pytest.raises(KeyboardInterrupt):
        train_run(config, run_dir, tmp_path, progress=False, dataset=tiny_dataset)
    assert not (run_dir / runs.SUMMARY).exists()
    monkeypatch.setattr(plots, "confident_mistakes", drawn)
    train_run(config, run_dir, tmp_path, resume=True, progress=False, dataset=tiny_dataset)
    assert (run_dir / runs.SUMMARY).is_file() and (run_dir / "confident_mistakes.png").is_file()


@pytest.mark.parametrize("scheduler", ["onecycle", "cosine", "plateau"])
def test_the_lr_column_is_the_rate_of_each_epochs_last_step(tiny_dataset, scheduler: str) -> None:
    from dataclasses import replace

    from kmnist.train import batches_per_epoch

    config = replace(TINY, scheduler=scheduler, warmup_epochs=1.0 if scheduler == "cosine" else 0.0)
    history = fit(config, tiny_dataset, None)
    steps = batches_per_epoch(600 - config.val_size, config.batch_size)
    for row in history:
        expected = config.lr
        if scheduler != "plateau":  # the per-step schedule, at the epoch's last step (not the next one's)
            expected *= lr_factor(config, row["epoch"] * steps - 1, config.epochs * steps, steps)
        assert row["lr"] == pytest.approx(expected, rel=1e-6)
    assert history[-1]["lr"] > 0  # the last step of an annealed schedule still learns


def test_a_run_resumed_on_other_data_is_refused(tiny_dataset, tmp_path: Path) -> None:
    from dataclasses import replace

    from kmnist.data import Split

    with pytest.raises(KeyboardInterrupt):
        fit(TINY, tiny_dataset, tmp_path, on_epoch=_stop_after_first)
    brighter = replace(tiny_dataset, train=Split(tiny_dataset.train.images // 2 + 100, tiny_dataset.train.labels))
    with pytest.raises(KmnistError, match="trained on other data files .training pixels: mean"):
        fit(TINY, brighter, tmp_path, resume=True)
    fewer = replace(tiny_dataset, test=Split(tiny_dataset.test.images[:150], tiny_dataset.test.labels[:150]))
    with pytest.raises(KmnistError, match="train/val/test images: 500/100/200; these: 500/100/150"):
        fit(TINY, fewer, tmp_path, resume=True)
    assert [row["epoch"] for row in fit(TINY, tiny_dataset, tmp_path, resume=True)] == [1, 2, 3]


def test_a_resume_that_rounds_differently_is_warned_about_and_recorded(tmp_path: Path, monkeypatch) -> None:
    import warnings

    from kmnist import runinfo, runner, runs
    from kmnist.errors import KmnistWarning

    placement = {"device": "cpu", "precision": "fp32"}
    runner.record_environment(tmp_path, resumed=False, placement=placement)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runner.record_environment(tmp_path, resumed=True, placement=placement)  # as it ran: nothing to say
    real = runinfo.environment
    monkeypatch.setattr(runner, "environment", lambda: {**real(), "gpus": ["a GPU it does not use"]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runner.record_environment(tmp_path, resumed=True, placement=placement)  # on the CPU, GPUs do not round
    monkeypatch.setattr(runner, "environment", lambda: {**real(), "torch_threads": 97})
    with pytest.warns(KmnistWarning, match=r"other placement than it last ran with \(torch_threads \d+ -> 97\)"):
        runner.record_environment(tmp_path, resumed=True, placement=placement)
    with pytest.warns(KmnistWarning, match=r"precision fp32 -> bf16"):
        runner.record_environment(tmp_path, resumed=True, placement={"device": "cpu", "precision": "bf16"})
    record = runs.read_json(tmp_path / runs.ENVIRONMENT)
    assert record["precision"] == "fp32" and [s["torch_threads"] for s in record["resumed"]][2:] == [97, 97]


def test_distillation_settings_without_a_teacher_are_warned_about() -> None:
    import warnings

    from kmnist.errors import KmnistWarning
    from kmnist.runner import prepare_run

    with pytest.warns(KmnistWarning, match="--distill-weight acts only with --teacher"):
        prepare_run(TrainConfig(distill_weight=0.9), None, resume=False)
    with pytest.warns(KmnistWarning, match="--distill-weight and --distill-temperature act only with --teacher"):
        prepare_run(TrainConfig(distill_weight=0.9, distill_temperature=2.0), None, resume=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_run(TrainConfig(), None, resume=False)


def test_a_batch_larger_than_the_training_split_is_warned_about(tiny_dataset, tmp_path: Path) -> None:
    import warnings

    from kmnist.errors import KmnistWarning
    from kmnist.runner import train_run

    left = len(tiny_dataset.train) - TINY.val_size
    config = TrainConfig(**{**TINY.to_dict(), "epochs": 1, "batch_size": left + 1})
    with pytest.warns(KmnistWarning, match=f"--batch-size {left + 1} is more than the {left} training images"):
        summary = train_run(config, tmp_path / "big", tmp_path, dataset=tiny_dataset)
    assert runs.read_metrics(tmp_path / "big")[0]["epoch"] == 1 and summary["final_train_acc"] >= 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_run(TrainConfig(**{**config.to_dict(), "batch_size": left}), tmp_path / "whole", tmp_path,
                  dataset=tiny_dataset)
