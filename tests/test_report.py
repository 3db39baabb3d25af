"""`kmnist report` on hand-made run directories: grouping by configuration, mean ± std over seeds, the files."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from kmnist import runs
from kmnist.cli import main
from kmnist.config import resolve_config
from kmnist.errors import KmnistError
from kmnist.report import markdown, write_report
from kmnist.results import collect, mean_std, versus_field


def make_run(folder: Path, preset: str | None = None, complete: bool = True, test_at_val: float = 90.0,
             max_test: float = 91.0, train_acc: float = 95.0, seconds: float = 10.0, epochs: int = 3,
             **overrides) -> Path:
    config = resolve_config(preset=preset, overrides=overrides)
    runs.write_json(folder / runs.CONFIG, config.to_dict())
    history = [{"epoch": e, "train_loss": 1.0 / e, "train_acc": train_acc - epochs + e, "val_loss": 1.0 / e,
                "val_acc": 80.0 + e, "test_loss": 1.0 / e, "test_acc": max_test - epochs + e, "lr": config.lr,
                "epoch_seconds": seconds / epochs, "eval_seconds": 0.1} for e in range(1, epochs + 1)]
    runs.write_metrics(folder, history)
    if complete:
        summary = runs.summarize(history)
        summary.update(test_acc_at_best_val=test_at_val, max_test_acc=max_test, final_train_acc=train_acc,
                       train_seconds=seconds)
        runs.write_json(folder / runs.SUMMARY, summary)
        runs.write_json(folder / runs.ENVIRONMENT, {"cpu": "Test CPU", "torch_threads": 2, "gpus": []})
    return folder


def test_mean_std() -> None:
    assert mean_std([90.0, 91.0, 92.0]) == (91.0, 1.0)
    assert mean_std([93.5]) == (93.5, None)
    mean, std = mean_std([])
    assert mean != mean and std is None


def test_groups_by_configuration_seed_aside(tmp_path: Path) -> None:
    for seed, (honest, top) in enumerate([(90.0, 92.0), (91.0, 93.0), (92.0, 94.0)]):
        # threads differ between seeds: placement, not a different configuration
        make_run(tmp_path / f"a{seed}", lr=0.01, seed=seed, threads=seed + 1, test_at_val=honest, max_test=top,
                 seconds=100.0 + seed)
    make_run(tmp_path / "b0", lr=0.001, test_at_val=95.0, max_test=95.5)
    make_run(tmp_path / "cut", lr=0.001, seed=1, complete=False)
    results = collect([tmp_path])
    assert results.varying == ["lr"]
    assert [group.label for group in results.groups] == ["lr=0.001", "lr=0.01"]
    small, large = results.groups
    assert len(large.runs) == 3 and large.seeds == [0, 1, 2] and large.stats["test_acc_at_best_val"] == (91.0, 1.0)
    assert large.stats["max_test_acc"] == (93.0, 1.0) and large.stats["train_seconds"] == (101.0, 1.0)
    assert small.stats["test_acc_at_best_val"] == (95.0, None)
    assert [run.name for run in results.incomplete] == ["cut"]
    assert versus_field(results) == "lr"
    table = markdown(results)
    assert "| lr=0.01 | 128 | 0.01 | 20 | 3 | 95.00 ± 0.00 | 91.00 ± 1.00 | 93.00 ± 1.00 | – | 101 ± 1 |" in table
    # lr=0.001 with every other field at its default is report-final: the report's number stands beside it
    assert "| lr=0.001 | 128 | 0.001 | 20 | 1 | 95.00 | 95.00 | 95.50 | 93.13 | 10 |" in table
    assert "test-selected" in table and "cut" in table and "Test CPU, 2 threads" in table


def test_a_folder_of_unrelated_runs_is_labelled_by_the_nearest_preset(tmp_path: Path) -> None:
    make_run(tmp_path / "fast", preset="cnn-fast-cpu")
    make_run(tmp_path / "fast-e30", preset="cnn-fast-cpu", batch_size=1024, val_size=0)
    make_run(tmp_path / "mixer", preset="mixer-best", model_args={"depth2": 4})
    make_run(tmp_path / "report", preset="report-row3", seed=3)
    make_run(tmp_path / "flat", model="mixer", lr=0.01)  # another model than the nearest preset's
    results = collect([tmp_path])
    assert len(results.varying) > 4 and results.columns == ["model"]
    assert [group.label for group in results.groups] == [
        "report-final, model=mixer lr=0.01",  # the mixer's own arguments at their defaults: not listed
        "report-row3", "cnn-fast-cpu", "cnn-fast-cpu, val_size=0 batch_size=1024", "mixer-best, model_args.depth2=4"]
    table = markdown(results)
    header = table.splitlines()[0]
    assert header.startswith("| configuration | model | batch size | learning rate | epochs | seeds |"), header
    assert "| cnn-fast-cpu, val_size=0 batch_size=1024 | resnet-small | 1024 | 0.2 | 20 | 1 |" in table
    assert "model_args.width" not in header and "val_size" not in header


def test_a_sweep_over_many_settings_keeps_a_column_for_each(tmp_path: Path) -> None:
    for index, (lr, rotate, weight_decay, label_smoothing, translate) in enumerate(
            [(0.1, 10.0, 5e-4, 0.1, 2.0), (0.2, 5.0, 1e-3, 0.0, 1.0), (0.2, 10.0, 5e-4, 0.1, 2.0)]):
        make_run(tmp_path / f"p{index}", preset="cnn-fast-cpu", lr=lr, rotate=rotate, weight_decay=weight_decay,
                 label_smoothing=label_smoothing, translate=translate)
    results = collect([tmp_path])
    assert results.varying == ["label_smoothing", "lr", "rotate", "translate", "weight_decay"]
    assert results.columns == results.varying  # a sweep, not a folder of unrelated runs
    assert [group.label for group in results.groups] == [
        "label_smoothing=0 lr=0.2 rotate=5 translate=1 weight_decay=0.001",
        "label_smoothing=0.1 lr=0.1 rotate=10 translate=2 weight_decay=0.0005",
        "label_smoothing=0.1 lr=0.2 rotate=10 translate=2 weight_decay=0.0005"]  # not "cnn-fast-cpu", the preset
    assert "| configuration | label_smoothing | rotate | translate | weight_decay |" in markdown(results)


def test_a_run_saved_before_a_field_existed_has_its_default(tmp_path: Path) -> None:
    make_run(tmp_path / "new", seed=0)
    make_run(tmp_path / "old", seed=1)
    saved = runs.read_json(tmp_path / "old" / runs.CONFIG)
    for name in ("clean_epochs", "teacher", "distill_weight", "distill_temperature"):  # fields added later
        del saved[name]
    runs.write_json(tmp_path / "old" / runs.CONFIG, saved)
    results = collect([tmp_path])
    assert len(results.groups) == 1 and results.groups[0].seeds == [0, 1] and results.varying == []
    assert results.groups[0].label == "report-final"  # still recognised as the report's preset


def test_presets_are_named_and_compared_with_the_report(tmp_path: Path) -> None:
    make_run(tmp_path / "row1", preset="report-row1")
    make_run(tmp_path / "final", preset="report-final")
    make_run(tmp_path / "final-patch4", preset="report-final", seed=1, model_args={"patch": 4})  # the default
    results = collect([tmp_path])
    assert [group.label for group in results.groups] == ["report-row1", "report-final"]
    assert [len(group.runs) for group in results.groups] == [1, 2]
    assert [group.reported_max_test_acc for group in results.groups] == [89.32, 93.13]
    assert versus_field(results) is None  # batch size, lr and epochs all vary
    assert "report: max test acc (%)" in markdown(results) and "| 89.32 |" in markdown(results)


def test_report_files_and_accuracy_against_patch(tmp_path: Path, capsys) -> None:
    for patch, honest in ((2, 88.0), (7, 92.0), (14, 85.0)):
        for seed in (0, 1):
            make_run(tmp_path / "sweep" / "trials" / f"model_args.patch={patch},seed={seed}", preset="report-final",
                     seed=seed, model_args={"patch": patch}, test_at_val=honest + seed)
    assert main(["report", str(tmp_path / "sweep")]) == 0
    out = tmp_path / "sweep" / "report"
    stdout = capsys.readouterr().out
    assert "| model_args.patch=7 | 7 | 128 | 0.001 | 20 | 2 |" in stdout
    for name in ("results.md", "results.csv", "report.html", "overlay.png", "accuracy_vs_model_args.patch.png"):
        assert (out / name).is_file(), name
    assert len(list((out / "curves").glob("*.png"))) == 6
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["model_args.patch"] for row in rows] == ["2", "7", "14"]
    assert [row["test_acc_at_best_val_mean"] for row in rows] == ["88.5000", "92.5000", "85.5000"]
    assert rows[0]["test_acc_at_best_val_std"] == "0.7071" and rows[0]["seed_values"] == "0 1"
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 + 6
    assert not re.findall(r"""(?:src|href)=['"](?!data:)""", page)


def test_report_errors(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(KmnistError, match="holds no run directories"):
        collect([tmp_path / "empty"])
    make_run(tmp_path / "runs" / "a", lr=0.01)
    make_run(tmp_path / "runs" / "b", lr=0.02)
    with pytest.raises(KmnistError, match="--vs batch_size: not a setting that varies"):
        write_report([tmp_path / "runs"], tmp_path / "out", vs="batch_size")
    assert not (tmp_path / "out").exists()  # refused before any file was written
    assert main(["report", str(tmp_path / "runs"), str(tmp_path / "nowhere")]) == 2
    assert "--out DIR" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such directory" in err[0]


def test_repeated_seeds_are_named_and_unreadable_files_are_one_line(tmp_path: Path, capsys) -> None:
    for name in ("a", "b"):  # the same configuration and seed, run twice
        make_run(tmp_path / "runs" / name, lr=0.01, seed=0)
    make_run(tmp_path / "runs" / "c", lr=0.01, seed=1)
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    text = (tmp_path / "out" / "results.md").read_text()
    assert "3 runs but 2 distinct seed(s); seed 0 was run more than once" in text
    assert "seed 0 was run more than once" in (tmp_path / "out" / "report.html").read_text()
    with open(tmp_path / "out" / "results.csv", newline="") as handle:
        row = next(csv.DictReader(handle))
    assert row["seed_values"] == "0 0 1" and row["runs"] == "3"

    (tmp_path / "runs" / "c" / runs.SUMMARY).write_text("{garbage")
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "summary.json: not readable JSON" in err[0]

    make_run(tmp_path / "cut" / "d", lr=0.01, complete=False)
    (tmp_path / "cut" / "d" / runs.METRICS).unlink()  # cut off before its first epoch ended
    assert main(["report", str(tmp_path / "cut"), "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing to report: 1 run(s) without summary.json and without a readable finished " \
        "epoch" in err[0]
    assert not (tmp_path / "out2").exists()
    (tmp_path / "cut" / "d" / runs.METRICS).write_text("garbage")  # unreadable: no curve to draw either
    assert main(["report", str(tmp_path / "cut"), "--out", str(tmp_path / "out2")]) == 2
    assert "nothing to report" in capsys.readouterr().err and not (tmp_path / "out2").exists()

    config = runs.read_json(tmp_path / "runs" / "a" / runs.CONFIG)
    del config["dataset"]  # not a kmnist run's configuration: one line, not a KeyError
    runs.write_json(tmp_path / "runs" / "a" / runs.CONFIG, config)
    assert main(["report", str(tmp_path / "runs" / "a"), "--out", str(tmp_path / "out3")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json: not a kmnist run configuration (no dataset)" in err[0]


def test_unfinished_runs_are_left_out_of_the_table_and_drawn_as_far_as_they_got(tmp_path: Path, capsys) -> None:
    make_run(tmp_path / "going", lr=0.01, epochs=3, complete=False)  # 3 of its 20 epochs so far
    make_run(tmp_path / "early", lr=0.01, complete=False)
    (tmp_path / "early" / runs.METRICS).unlink()  # no epoch finished: nothing to draw
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "0 finished run(s) in 0 configuration(s), 2 unfinished" in printed
    assert "1 learning-curve figure(s)" in printed and "(1 of unfinished runs, as far as they got)" in printed
    table = (tmp_path / "out" / "results.md").read_text()
    assert table.startswith("No finished runs yet") and "| configuration |" not in table
    assert "early, going (3 of 20 epochs)." in table and "those with a finished epoch are drawn in report.html" in table
    assert [path.name for path in (tmp_path / "out" / "curves").iterdir()] == ["going.png"]
    page = (tmp_path / "out" / "report.html").read_text()
    assert "Unfinished runs (not in the table)" in page and "<figcaption>going: 3 of 20 epochs</figcaption>" in page
    assert "<table>" not in page

    # Beside a finished run: the finished one is tabulated, the unfinished one only drawn.
    make_run(tmp_path / "done", lr=0.01, seed=1, test_at_val=97.0)
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "1 finished run(s) in 1 configuration(s), 2 unfinished" in printed
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| 1 | 95.00 | 97.00 |" in table and "going (3 of 20 epochs)" in table
    assert sorted(path.name for path in (tmp_path / "out" / "curves").iterdir()) == ["done.png", "going.png"]


def test_a_bar_counts_the_runs_drawn_on_a_terminal_only(tmp_path: Path, monkeypatch) -> None:
    import tqdm

    bars = []

    class Bar:  # records what the report asks of its bar
        def __init__(self, total: int, disable: bool | None, **kwargs) -> None:
            self.total, self.disable, self.n, self.closed = total, disable, 0, False
            bars.append(self)

        def update(self) -> None:
            self.n += 1

        def close(self) -> None:
            self.closed = True

        def __enter__(self) -> "Bar":
            return self

        def __exit__(self, *exc_info) -> None:
            self.close()

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    make_run(tmp_path / "runs" / "going", lr=0.01, epochs=3, complete=False)
    make_run(tmp_path / "runs" / "done", lr=0.01, seed=1)
    make_run(tmp_path / "runs" / "other", lr=0.1, seed=1)
    write_report([tmp_path / "runs"], tmp_path / "out", progress=True)
    write_report([tmp_path / "runs"], tmp_path / "out2")
    assert [(bar.total, bar.n, bar.closed) for bar in bars] == [(3, 3, True), (3, 3, True)]
    assert [bar.disable for bar in bars] == [None, True]  # None: tqdm shows it where stderr is a terminal


def test_a_run_of_one_epoch_is_drawn_on_whole_epochs(tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    from kmnist import plots

    figure = Figure()
    axis = figure.subplots()
    axis.plot([1], [80.0])
    plots._epoch_axis(axis, [1])
    figure.canvas.draw()
    assert list(axis.get_xticks()) == [0.0, 1.0, 2.0]  # not 0.95, 0.96, ... 1.05


def test_runs_without_a_validation_split_show_their_final_test_accuracy(tmp_path: Path, capsys) -> None:
    make_run(tmp_path / "fixed", val_size=0, max_test=91.0)  # the last epoch's test accuracy is 91.0
    make_run(tmp_path / "chosen", max_test=92.0)
    summary = runs.read_json(tmp_path / "fixed" / runs.SUMMARY)
    runs.write_json(tmp_path / "fixed" / runs.SUMMARY, {**summary, "max_test_acc": 93.0})  # not the column's
    table = markdown(collect([tmp_path]))
    header = table.splitlines()[0]
    assert "final test acc (%)" in header
    column = [cell.strip() for cell in header.split("|")].index("final test acc (%)")
    values = {line.split("|")[1].strip(): line.split("|")[column].strip() for line in table.splitlines()[2:4]}
    assert values == {"val_size=0": "91.00", "val_size=5000": "92.00"}


def test_a_finished_run_with_no_epochs_in_its_table_is_one_line_and_writes_nothing(tmp_path: Path, capsys) -> None:
    run = make_run(tmp_path / "runs" / "a", lr=0.01)
    (run / runs.METRICS).write_text((run / runs.METRICS).read_text().splitlines()[0] + "\n")  # header only
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metrics.csv holds no epochs" in err[0]
    assert not (tmp_path / "out").exists()


def test_hardware_names_the_cpu_features_that_set_its_speed() -> None:
    from kmnist.runinfo import environment, hardware_summary

    # Two CPUs with one model name, one with bf16 matrix units and one without, are told apart.
    zen5 = {"cpu": "AMD EPYC", "torch_threads": 2, "cpu_features": ["avx2", "avx512f", "avx512_bf16"]}
    zen3 = {"cpu": "AMD EPYC", "torch_threads": 2, "cpu_features": ["avx2"]}
    assert hardware_summary(zen5) == "AMD EPYC (AVX512-BF16), 2 threads"
    assert hardware_summary(zen3) == "AMD EPYC (AVX2), 2 threads"
    assert hardware_summary({"cpu": "AMD EPYC", "torch_threads": 2}) == "AMD EPYC, 2 threads"  # saved before
    assert hardware_summary({"cpu": "AMD EPYC", "torch_threads": 1}) == "AMD EPYC, 1 thread"
    assert set(environment()["cpu_features"]) <= {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}


@pytest.mark.parametrize("name", [runs.CONFIG, runs.SUMMARY, runs.ENVIRONMENT])
def test_a_run_file_of_the_wrong_shape_is_one_line_and_writes_nothing(tmp_path: Path, capsys, name: str) -> None:
    run = make_run(tmp_path / "runs" / "a", lr=0.01)
    (run / name).write_text("[1, 2]")  # valid JSON, but not the object a run record is
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{name}: not a run record" in err[0]
    assert not (tmp_path / "out").exists()


def test_hardware_of_an_odd_environment_record_is_named_as_far_as_it_goes() -> None:
    from kmnist.results import sessions
    from kmnist.runinfo import hardware_summary

    odd = {"cpu_features": 5, "torch_threads": 2, "resumed": [3, {"cpu": "Y", "cpu_features": ["avx2"]}]}
    assert [hardware_summary(env) for env in sessions(odd)] == ["unknown CPU, 2 threads", "Y (AVX2)"]


def test_the_overlay_leaves_out_the_validation_panel_only_when_no_run_has_one(tmp_path: Path, monkeypatch) -> None:
    from kmnist import plots

    nan = float("nan")
    fixed = {"label": "fixed", "epoch": [1, 2], "val_acc": ([nan, nan], [0.0, 0.0]),
             "test_acc": ([90.0, 91.0], [0.0, 0.0]), "train_loss": ([1.0, 0.5], [0.0, 0.0])}
    chosen = {**fixed, "label": "chosen", "val_acc": ([89.0, 90.0], [0.0, 0.0])}
    drawn = []
    real_save = plots._save

    def recording_save(figure, path):
        drawn.append(figure)
        return real_save(figure, path)

    monkeypatch.setattr(plots, "_save", recording_save)
    plots.overlay_curves([fixed], tmp_path / "fixed.png")
    plots.overlay_curves([fixed, chosen], tmp_path / "both.png")
    titles = [[axis.get_title() for axis in figure.axes] for figure in drawn]
    assert titles[0] == ["test accuracy (%)", "training loss (cross-entropy)"]  # no empty validation panel
    assert titles[1][0] == "validation accuracy (%)" and len(titles[1]) == 3
    legend_labels = [text.get_text() for text in drawn[1].legends[0].get_texts()]
    assert legend_labels == ["fixed", "chosen"]  # the run without validation is named in the legend too
    assert (tmp_path / "fixed.png").stat().st_size > 0


def test_k49_runs_without_a_validation_split_show_their_final_balanced_accuracy(tmp_path: Path) -> None:
    for seed, balanced in ((0, 82.0), (1, 86.0)):
        folder = make_run(tmp_path / f"s{seed}", dataset="k49", val_size=0, seed=seed)
        summary = runs.read_json(folder / runs.SUMMARY)
        runs.write_json(folder / runs.SUMMARY, {**summary, "final_test_bal_acc": balanced})
    table = markdown(collect([tmp_path]))
    header = [cell.strip() for cell in table.splitlines()[0].split("|")]
    row = [cell.strip() for cell in table.splitlines()[2].split("|")]
    assert row[header.index("final test balanced acc (%)")] == "84.00 ± 2.83"


def test_a_metrics_table_without_the_curves_columns_is_one_line(tmp_path: Path, capsys) -> None:
    run_dir = make_run(tmp_path / "run")
    (run_dir / runs.METRICS).write_text("epoch,train_loss\n1,0.5\n")
    code = main(["report", str(run_dir)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no column train_acc, test_loss, test_acc" in err


def test_a_summary_value_that_is_not_a_number_is_one_line(tmp_path: Path, capsys) -> None:
    run_dir = make_run(tmp_path / "run")
    runs.write_json(run_dir / runs.SUMMARY, {**runs.read_json(run_dir / runs.SUMMARY), "final_test_acc": "abc"})
    code = main(["report", str(run_dir)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "final_test_acc is not a number ('abc')" in err


def test_runs_whose_names_share_a_file_name_get_a_figure_each(tmp_path: Path, capsys) -> None:
    make_run(tmp_path / "runs" / "実験", max_test=90.0)
    make_run(tmp_path / "runs" / "試験", max_test=50.0, epochs=5)
    make_run(tmp_path / "runs" / "run$_$1", max_test=70.0)  # "$" is not mathematics in a title
    code = main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    curves = sorted(path.name for path in (tmp_path / "out" / "curves").iterdir())
    assert len(curves) == 3 and len({path.read_bytes() for path in (tmp_path / "out" / "curves").iterdir()}) == 3
    assert all("~" in name for name in curves)  # changed names carry a digest of the original


def test_accuracy_against_a_setting_draws_one_line_per_combination_of_the_others(tmp_path: Path) -> None:
    from kmnist.report import versus_series

    for lr in (0.01, 0.1):
        for batch_size in (64, 256):
            make_run(tmp_path / f"lr{lr}-b{batch_size}", lr=lr, batch_size=batch_size,
                     test_at_val=(90.0 if batch_size == 64 else 70.0) + lr * 10)
    series = versus_series(collect([tmp_path]), "lr")
    assert series == {"test accuracy at best validation epoch: batch_size=64": ([0.01, 0.1], [90.1, 91.0], [0.0, 0.0]),
                      "test accuracy at best validation epoch: batch_size=256": ([0.01, 0.1], [70.1, 71.0],
                                                                                  [0.0, 0.0])}
    fixed = tmp_path / "fixed"
    for lr in (0.01, 0.1):
        make_run(fixed / f"lr{lr}", lr=lr, val_size=0, max_test=80.0 + lr * 10)
    assert "final test accuracy (no validation split)" in versus_series(collect([fixed]), "lr")


def test_figures_leave_the_callers_matplotlib_as_it_was(tmp_path: Path) -> None:
    import subprocess
    import sys

    # A fresh interpreter, as a notebook importing kmnist would be: its backend and settings, before and after.
    script = f"""
import warnings
import matplotlib
state = lambda: (matplotlib.get_backend(), matplotlib.rcParams["text.parse_math"], matplotlib.rcParams["font.family"])
before = state()
from kmnist import plots
warnings.simplefilter("error")  # a missing glyph (a kana drawn as a box) is a warning
plots.confusion_matrix([[3, 1], [0, 4]], ["お", "き"], {str(tmp_path / "kana.png")!r}, title="run $1$ お")
print(before == state())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True" and (tmp_path / "kana.png").stat().st_size > 0


def test_notes_explain_only_the_columns_shown_and_folders_without_a_config_are_named(tmp_path: Path,
                                                                                      capsys) -> None:
    make_run(tmp_path / "runs" / "held-out", lr=0.01)
    table = markdown(collect([tmp_path / "runs"]))
    assert "*Test acc at best val epoch*" in table and "*Max test acc*" in table
    assert "*Final test acc*" not in table and "balanced" not in table.split("|---")[0]
    assert "*Test balanced acc*" not in table and "*Final test balanced acc*" not in table
    make_run(tmp_path / "runs" / "all-data", lr=0.01, val_size=0)
    assert "*Final test acc*" in markdown(collect([tmp_path / "runs"]))

    copied = tmp_path / "runs" / "saved-elsewhere"  # a run's files kept without its config.json
    copied.mkdir()
    (copied / runs.METRICS).write_bytes((tmp_path / "runs" / "held-out" / runs.METRICS).read_bytes())
    code = main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0
    assert "1 folder(s) without config.json left out" in out
    assert f"Left out (1 folder(s) with run files but no config.json, so no settings to group them by): {copied}" in out
    assert str(copied) in (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    code = main(["report", str(copied), str(tmp_path / "runs" / "held-out"), "--out", str(tmp_path / "out2")])
    assert code == 0 and "1 folder(s) without config.json left out" in capsys.readouterr().out  # named directly
    code = main(["report", str(copied), "--out", str(tmp_path / "out3")])  # alone: nothing to report, one line
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "nothing to report; Left out (1 folder(s)" in err


def test_learning_curves_mark_the_epoch_chosen_by_validation(tmp_path: Path, monkeypatch) -> None:
    from kmnist import plots

    drawn = []
    real_save = plots._save
    monkeypatch.setattr(plots, "_save", lambda figure, path: drawn.append(figure) or real_save(figure, path))
    nan = float("nan")
    row = lambda epoch, val, val_bal: {"epoch": epoch, "train_loss": 1.0, "train_acc": 90.0, "val_loss": 1.0,  # noqa: E731
                                       "val_acc": val, "val_bal_acc": val_bal, "test_loss": 1.0, "test_acc": 99.0 - epoch,
                                       "test_bal_acc": 90.0}
    history = [row(1, 80.0, 70.0), row(2, 85.0, 75.0), row(3, 85.0, 72.0), row(4, 84.0, 76.0)]
    plots.learning_curves(history, tmp_path / "a.png")  # the first of the best (epoch 2), not the test's epoch 1
    plots.learning_curves(history, tmp_path / "k49.png", balanced=True)  # K49: by balanced accuracy
    plots.learning_curves([row(e, nan, nan) for e in (1, 2)], tmp_path / "none.png")  # nothing held out
    labels = [[text.get_text() for text in figure.axes[0].get_legend().get_texts()] for figure in drawn]
    assert "chosen by validation (epoch 2)" in labels[0]
    assert "chosen by validation (epoch 4)" in labels[1]
    assert not any(label.startswith("chosen") for label in labels[2])
