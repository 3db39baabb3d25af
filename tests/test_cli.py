"""The command line end to end: a real run on small data, evaluate, and one-line errors for bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FakeResponse, copy_real, write_dataset
from kmnist import cli, runs
from kmnist.cli import main

SMALL = ["--epochs", "2", "--val-size", "100", "--batch-size", "64", "--threads", "1", "--no-progress",
         "--model-arg", "token_hidden=64", "--model-arg", "channel_hidden=64"]


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_train_then_evaluate(data_dir: Path, tmp_path: Path, offline: None, capsys) -> None:
    run_dir = tmp_path / "run"
    code, out, err = run_cli(["train", "--data-dir", str(data_dir), "--skip-md5", "--out", str(run_dir), *SMALL],
                             capsys)
    assert code == 0, err
    assert "test accuracy at that epoch" in out and "test-selected" in out
    table = [line.split() for line in out.splitlines() if line.split()[:1] in (["epoch"], ["1"], ["2"])]
    assert table[0][-1] == "left" and len(table) == 3
    assert table[2][-1] == "0:00:00"  # after the last epoch nothing is left
    for name in ("config.json", "metrics.csv", "summary.json", "environment.json", "best.pt", "last.pt",
                 "learning_curves.png", "confusion_matrix.png", "confident_mistakes.png", runs.PREDICTIONS):
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("final_test_acc", "final_train_loss", "final_train_acc", "best_val_acc", "best_epoch",
                "test_acc_at_best_val", "max_test_acc", "max_test_epoch", "train_seconds"):
        assert key in summary
    assert summary["epochs"] == 2
    assert json.loads((run_dir / "config.json").read_text())["model_args"]["token_hidden"] == 64

    code, out, err = run_cli(["evaluate", str(run_dir / "best.pt"), "--data-dir", str(data_dir), "--skip-md5",
                              "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["count"] == 200 and 0 <= result["balanced_accuracy"] <= 100
    assert Path(result["confusion_matrix_png"]).is_file()
    assert abs(result["accuracy"] - summary["test_acc_at_best_val"]) < 1e-6

    code, out, err = run_cli(["evaluate", str(run_dir / "best.pt"), "--data-dir", str(data_dir), "--skip-md5",
                              "--model", "some-other-model"], capsys)
    assert_one_line_error(code, err, "holds model")

    # The test split is all evaluating on it needs; the validation split needs the training files.
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (data_dir / "kmnist" / name).unlink()
    code, out, err = run_cli(["evaluate", str(run_dir / "best.pt"), "--data-dir", str(data_dir), "--skip-md5",
                              "--json", "--out", str(tmp_path / "test-only")], capsys)
    assert code == 0, err
    assert json.loads(out)["accuracy"] == result["accuracy"]
    code, out, err = run_cli(["evaluate", str(run_dir / "best.pt"), "--data-dir", str(data_dir), "--skip-md5",
                              "--split", "val"], capsys)
    assert_one_line_error(code, err, "kmnist files missing: train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz;")

    # A finished run cannot be overwritten by accident.
    code, out, err = run_cli(["train", "--data-dir", str(data_dir), "--skip-md5", "--out", str(run_dir), *SMALL],
                             capsys)
    assert_one_line_error(code, err, "already holds a run")


def test_evaluating_the_validation_split_of_a_run_without_one_reads_no_data(tiny_checkpoint: Path, tmp_path: Path,
                                                                            offline: None, capsys) -> None:
    payload = torch.load(tiny_checkpoint, weights_only=True)
    payload["config"]["val_size"] = 0
    checkpoint = tmp_path / "no-val.pt"
    torch.save(payload, checkpoint)
    code, _, err = run_cli(["evaluate", str(checkpoint), "--data-dir", str(tmp_path / "empty"), "--split", "val"],
                           capsys)
    assert_one_line_error(code, err, "was trained without a validation split")
    assert not (tmp_path / "empty").exists()


def test_runs_started_in_the_same_second_get_folders_of_their_own(data_dir: Path, tmp_path: Path, monkeypatch,
                                                                   capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("time.strftime", lambda fmt: "20261202-065050")  # both start "at the same second"
    made = []
    for seed in ("1", "2"):
        code, out, err = run_cli(["train", "--data-dir", str(data_dir), "--skip-md5", "--seed", seed, *SMALL,
                                  "--epochs", "1"], capsys)
        assert code == 0, err
        made.append(Path(out.split("run directory ", 1)[1].split()[0]))
    stamped = Path("runs/kmnist-report-mixer-20261202-065050")
    assert made == [stamped, stamped.with_name(stamped.name + "-2")]
    assert [runs.read_json(folder / runs.CONFIG)["seed"] for folder in made] == [1, 2]
    # A folder named with --out that another run has claimed: its config.json written, no epoch ended yet.
    claimed = tmp_path / "claimed"
    claimed.mkdir()
    (claimed / runs.CONFIG).write_bytes((made[0] / runs.CONFIG).read_bytes())
    code, _, err = run_cli(["train", "--data-dir", str(data_dir), "--skip-md5", "--out", str(claimed), *SMALL], capsys)
    assert_one_line_error(code, err, "already holds a run; continue it with --resume")
    assert sorted(p.name for p in claimed.iterdir()) == [runs.CONFIG]


def test_a_run_folder_is_claimed_only_while_free(tmp_path: Path) -> None:
    from kmnist.cli import claim_new_folder, remove_empty_folders
    from kmnist.files import atomic_writer

    first, created = claim_new_folder(tmp_path / "a" / "b" / "run")
    second, _ = claim_new_folder(tmp_path / "a" / "b" / "run")
    assert (first.name, second.name) == ("run", "run-2") and created == [tmp_path / "a", tmp_path / "a" / "b", first]
    remove_empty_folders(created)  # b still holds run-2: only run itself goes
    assert not first.exists() and second.is_dir()
    # Two processes writing the same config.json: the second to finish finds the name taken and changes nothing.
    target = tmp_path / "config.json"
    with pytest.raises(FileExistsError):
        with atomic_writer(target, "w", exclusive=True) as out:
            out.write("mine")
            target.write_text("theirs")  # the other process gets there first
    assert target.read_text() == "theirs" and [p.name for p in tmp_path.iterdir() if p.is_file()] == ["config.json"]


def test_a_missing_optional_package_is_one_line(data_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "optuna", None)  # as if `pip install kmnist` without the sweep extra
    code, _, err = run_cli(["sweep", "--grid", "lr=0.1,0.2", "--out", "sweeps/s", "--data-dir", str(data_dir),
                            "--skip-md5"], capsys)
    assert_one_line_error(code, err, "kmnist sweep: error: needs optuna, which is not installed",
                          "pip install 'kmnist[sweep]'")


def test_config_file_and_cli_override(data_dir: Path, tmp_path: Path, capsys) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("epochs: 1\nlr: 0.002\nval_size: 50\nmodel_args:\n  token_hidden: 32\n  channel_hidden: 32\n")
    run_dir = tmp_path / "run"
    code, _, err = run_cli(["train", "--data-dir", str(data_dir), "--skip-md5", "--config", str(config), "--lr",
                            "0.003", "--out", str(run_dir), "--no-progress", "--threads", "1"], capsys)
    assert code == 0, err
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["epochs"] == 1 and saved["lr"] == 0.003 and saved["model_args"]["token_hidden"] == 32


def test_without_validation_split_the_final_epoch_is_the_result(data_dir: Path, tmp_path: Path, capsys,
                                                               monkeypatch) -> None:
    from kmnist import plots

    titles = []
    real_confusion_matrix = plots.confusion_matrix

    def recording_confusion_matrix(*args, title="", **kwargs):
        titles.append(title)
        return real_confusion_matrix(*args, title=title, **kwargs)

    monkeypatch.setattr(plots, "confusion_matrix", recording_confusion_matrix)
    run_dir = tmp_path / "run"
    args = [arg if arg != "100" else "0" for arg in SMALL]  # --val-size 0
    code, out, err = run_cli(["train", "--data-dir", str(data_dir), "--skip-md5", "--out", str(run_dir), *args],
                             capsys)
    assert code == 0, err
    assert "the final epoch is the result" in out and "test accuracy at that epoch" not in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["1"], ["2"])]
    assert len(rows) == 2 and all(row[3:5] == ["-", "-"] for row in rows), out  # no validation scores: dashes, not nan
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_epoch"] is None and summary["selected_on"] is None
    assert torch.load(run_dir / "best.pt", weights_only=True)["epoch"] == 2  # best.pt is the final epoch's model
    assert titles == ["test, epoch 2 model (final epoch, no validation)"]  # not "chosen on validation"


@pytest.mark.parametrize("args, fragment", [
    (["train", "--epochs", "zero"], "epochs must be a whole number"),
    (["train", "--epochs", "1.5"], "epochs must be a whole number"),
    (["train", "--lr", "inf"], "lr must be a finite number"),
    (["train", "--weight-decay", "nan"], "--weight-decay must be a finite number"),
    (["train", "--ema", "1.5"], "ema must be in [0, 1), got 1.5"),
    (["train", "--seed", "9223372036854775807"], "seed must be between -999999999999 and 999999999999"),
    (["train", "--seed", "-1000000000000"], "seed must be between"),
    (["train", "--preset", "quick-cnn", "--model-arg", "width=0"], "width must be a whole number of at least 1"),
    (["train", "--preset", "quick-cnn", "--model-arg", "width=-3"], "width must be a whole number of at least 1"),
    (["train", "--preset", "quick-cnn", "--model-arg", "depth=-1"], "depth must be a whole number of at least 0"),
    (["train", "--preset", "quick-cnn", "--model-arg", "depth=1.5"], "depth must be a whole number"),
    (["train", "--preset", "quick-cnn", "--model-arg", "width=1e9"], "width must be a whole number"),
    (["train", "--model-arg", "channels=0"], "channels must be a whole number of at least 1"),
    (["train", "--model-arg", "residual=maybe"], "residual must be true or false"),
    (["train", "--model", "mixer", "--model-arg", "drop_path=5"], "drop_path is a rate"),
    (["train", "--model", "mixer", "--model-arg", "dropout=nan"], "dropout must be a finite number"),
    (["train", "--lr", "-1"], "--lr must be positive"),
    (["train", "--model", "mixer", "--model-arg", "patch=30", "--model-arg", "stride=2"], "must tile 28 pixels"),
    (["train", "--preset", "quick-cnn", "--model-arg", "width=" + "1" * 20], "width must be a whole number of at most"),
    (["train", "--model", "mixer", "--model-arg", "drop_path=1" + "0" * 400], "drop_path must be a finite number"),
    (["train", "--epochs", "3", "--clean-epochs", "4"], "--clean-epochs must be between 0 and epochs (3), got 4"),
    (["train", "--device", "tpu"], "--device must be one of"),
    (["train", "--model", "nope"], "unknown model"),
    (["train", "--model-arg", "patch=5"], "patch must divide"),
    (["train", "--preset", "nope"], "invalid choice"),
    (["train", "--config", "/no/such/file.toml"], "config file not found"),
    (["train", "--compile", "cuda-graph", "--device", "cpu"], "needs a CUDA device"),
    (["train", "--compile", "cuda-graph", "--mixup", "0.2"], "mixup/cutmix"),
    (["train", "--compile", "cuda-graph-compiled", "--device", "cpu"], "cuda-graph-compiled needs a CUDA device"),
    (["sweep", "--grid", "lr=0.001,0.01", "--compile", "cuda-graph", "--device", "cpu", "--out", "sweeps/s"],
     "needs a CUDA device"),
    (["evaluate", "/no/such/checkpoint.pt"], "checkpoint not found"),
    (["train", "--bogus"], "kmnist train: error: unrecognized arguments: --bogus"),
    (["train", "--resume", "old", "--out", "new"], "--resume continues old in place; --out new names another"),
    (["predict", "a.pt", "b.png", "--max-megapixels", "nan"], "--max-megapixels: must be a finite number"),
    (["predict", "a.pt", "b.png", "--max-file-mb", "-1"], "--max-file-mb: must be a positive number"),
    (["serve", "a.pt", "--max-upload-mb", "inf"], "--max-upload-mb: must be a finite number"),
    (["serve", "a.pt", "--max-upload-mb", "0"], "--max-upload-mb: must be a positive number"),
    (["export", "a.pt", "--onnx", "a.onnx", "--tolerance", "-1"], "--tolerance: must be 0 or more"),
    (["train", "--val-size", "999999"], "--val-size must be between 0 and"),  # checked once the data is loaded
    # One training image left would make no batch at all (a batch of one is dropped for BatchNorm).
    (["train", "--val-size", "599"], "--val-size must be between 0 and 598 (at least 2 training images left), got 599"),
    (["train", "--optimizer", "sgd", "--momentum", "0"], "--momentum must be in (0, 1), got 0.0"),
    (["train", "--momentum", "5"], "--momentum must be in (0, 1), got 5.0"),
    (["train", "--threads", "100000000000"], "--threads must be at most 4096"),
    (["train", "--scale", "1"], "--scale must be below 1"),  # a factor of 0 or less: a character shrunk away or turned
    (["train", "--shear", "90"], "--shear must be below 90 degrees"),
    # A shift or distortion of a whole side leaves a blank image; past 180 degrees a turn is a smaller one.
    (["train", "--translate", "28"], "--translate must be below 28 pixels (the image's side), got 28.0"),
    (["train", "--elastic", "1e3"], "--elastic must be below 28 pixels"),
    (["train", "--rotate", "181"], "--rotate must be at most 180 degrees, got 181.0"),
    # A negative number in scientific notation is the option's value (argparse before 3.13 took it for an option).
    (["train", "--weight-decay", "-5e-4"], "--weight-decay must not be negative, got -0.0005"),
    (["train", "--lr=-1E-3"], "--lr must be positive, got -0.001"),
    (["train", "--seed", "-1e13"], "--seed must be between"),
    (["sweep", "--grid", "lr=0.001,0.01", "--val-size", "999999", "--out", "sweeps/s"], "val_size must be between"),
    (["sweep", "--grid", "lr=0.001,0.01", "--teacher", "/no/such/teacher.pt", "--val-size", "100", "--out", "sweeps/s"],
     "checkpoint not found"),
])
def test_bad_options_give_one_line(args: list[str], fragment: str, data_dir: Path, tmp_path: Path, monkeypatch,
                                   capsys) -> None:
    monkeypatch.chdir(tmp_path)
    with_data = args[0] in ("train", "sweep")
    code, _, err = run_cli([*args, "--data-dir", str(data_dir), "--skip-md5"] if with_data else args, capsys)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "sweeps").exists()


def test_errors_name_the_option_or_the_config_field_that_was_given(data_dir: Path, tmp_path: Path, monkeypatch,
                                                                    capsys) -> None:
    monkeypatch.chdir(tmp_path)
    Path("bad.toml").write_text("lr = -1.0\nval_size = 999999\n")
    for args, fragment in ((["--config", "bad.toml"], "error: lr must be positive"),  # the file's own words
                           (["--config", "bad.toml", "--lr", "0.1"], "error: val_size must be between"),
                           (["--config", "bad.toml", "--lr", "-2"], "error: --lr must be positive, got -2.0")):
        code, _, err = run_cli(["train", *args, "--data-dir", str(data_dir), "--skip-md5"], capsys)
        assert_one_line_error(code, err, fragment)
    assert not Path("runs").exists()


def test_a_path_that_cannot_be_written_is_one_line(data_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    Path("taken").write_text("a file where a folder is asked for")
    code, _, err = run_cli(["train", "--out", "taken/run", "--epochs", "1", "--val-size", "100", "--data-dir",
                            str(data_dir), "--skip-md5", "--no-progress"], capsys)
    assert_one_line_error(code, err, "kmnist train: error: --out taken/run: taken is a file, not a folder")
    # A file where a folder is named: one line naming the option, before any work, exit 2.
    Path("model.pt").mkdir()
    for args, fragment in ((["train", "--out", "taken", "--data-dir", str(data_dir)], "--out taken is a file"),
                           (["train", "--data-dir", "taken"], "--data-dir taken is a file, not a folder"),
                           (["evaluate", "model.pt"], "model.pt is a folder, not a checkpoint file"),
                           (["report", "taken"], "taken is a file; name run or sweep folders"),
                           (["sweep", "--grid", "lr=0.1", "--out", "taken"], "--out taken is a file"),
                           (["bench", "--full", "--out", "taken/run"], "--out taken/run: taken is a file")):
        code, out, err = run_cli(args, capsys)
        assert code == 2
        assert_one_line_error(code, err, fragment)
    assert sorted(p.name for p in Path(".").iterdir() if p.name != data_dir.name) == ["model.pt", "taken"]
    # The output files of a benchmark are checked before it starts, not after minutes of work.
    cases = [(["--json", "taken/x/bench.json"], "--json taken/x/bench.json: taken is a file, not a"),
             (["--markdown", "."], "--markdown . is a folder")]
    if Path("/proc/self").is_dir():  # a folder no one can make files in, root included (os.access says yes to root)
        cases.append((["--json", "/proc/bench.json"], "--json /proc/bench.json: cannot write in /proc"))
    for args, fragment in cases:
        code, out, err = run_cli(["bench", *args, "--data-dir", str(data_dir), "--skip-md5"], capsys)
        assert_one_line_error(code, err, fragment)
        assert "benchmarking" not in out


def test_missing_data_offline(tmp_path: Path, offline: None, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # where the default run directory (runs/...) would go
    code, _, err = run_cli(["train", "--data-dir", str(tmp_path / "empty"), "--no-progress"], capsys)
    assert_one_line_error(code, err, "files missing", "train-images-idx3-ubyte.gz", "put the official files in")
    assert not (tmp_path / "runs").exists()  # a user mistake leaves no run directory behind
    assert not (tmp_path / "empty").exists()  # nor the data folder it named
    code, _, err = run_cli(["download", "--data-dir", str(tmp_path / "empty"), "--no-progress"], capsys)
    assert_one_line_error(code, err, "files missing")


@pytest.mark.parametrize("fast_bf16", [False, True])
def test_bf16_on_a_cpu_without_bf16_units_is_warned_of(fast_bf16: bool, tmp_path: Path, offline: None,
                                                       monkeypatch, capsys) -> None:
    monkeypatch.setattr("kmnist.metrics.has_fast_bf16", lambda: fast_bf16)
    code, _, err = run_cli(["train", "--precision", "bf16", "--device", "cpu", "--data-dir", str(tmp_path / "empty"),
                            "--no-progress", "--out", str(tmp_path / "run")], capsys)
    assert code != 0 and "files missing" in err  # stops at the data, after the warning
    assert ("no bf16 matrix units" in err) is not fast_bf16


def test_corrupted_data_file(data_dir: Path, tmp_path: Path, offline: None, capsys) -> None:
    (data_dir / "kmnist" / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b broken")
    code, _, err = run_cli(["train", "--data-dir", str(data_dir), "--skip-md5", "--out", str(tmp_path / "r"),
                            *SMALL], capsys)
    assert_one_line_error(code, err, "t10k-images-idx3-ubyte.gz")
    # With md5 checks on (the default), a file that is not the official one is refused before parsing.
    code, _, err = run_cli(["download", "--data-dir", str(data_dir), "--no-progress"], capsys)
    assert_one_line_error(code, err, "idx3-ubyte.gz", "expected")


def test_download_verifies_every_file_of_the_format_asked_for(real_data_dir: Path, tmp_path: Path, offline: None,
                                                              capsys) -> None:
    """The npz files are found first; a corrupted idx file must still fail `download --format idx` and `all`."""
    names = [p.name for p in (real_data_dir / "kmnist").iterdir() if p.suffix in (".gz", ".npz", ".csv")]
    folder = copy_real(real_data_dir, tmp_path, names) / "kmnist"
    broken = folder / "t10k-labels-idx1-ubyte.gz"
    raw = broken.read_bytes()
    broken.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))  # same size, one bit changed
    for fmt in ("idx", "all"):  # offline: it cannot be fetched again
        code, _, err = run_cli(["download", "--format", fmt, "--data-dir", str(tmp_path), "--no-progress"], capsys)
        assert_one_line_error(code, err, "t10k-labels-idx1-ubyte.gz: md5 does not match", "put the official")
    assert broken.read_bytes() != raw  # left as it was
    code, out, err = run_cli(["download", "--format", "npz", "--data-dir", str(tmp_path), "--no-progress"], capsys)
    assert code == 0, err
    assert "kmnist (npz): 60000 train and 10000 test images, 10 classes, verified" in out


def test_download_fetches_a_corrupted_file_again(real_data_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    import urllib.request

    from kmnist.data import DATASETS

    spec = DATASETS["kmnist"]
    names = [f.name for f in (*spec.formats["idx"], spec.classmap)]
    folder = copy_real(real_data_dir, tmp_path, names) / "kmnist"
    broken = folder / "t10k-labels-idx1-ubyte.gz"
    good = broken.read_bytes()
    broken.write_bytes(good[:100])  # cut short

    asked = []
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda url, timeout=None: asked.append(url) or FakeResponse((real_data_dir / "kmnist" /
                                                                                  url.rsplit("/", 1)[1]).read_bytes()))
    code, out, err = run_cli(["download", "--data-dir", str(tmp_path), "--no-progress"], capsys)
    assert code == 0, err
    assert "t10k-labels-idx1-ubyte.gz: 100 bytes, expected 5120 (truncated or incomplete): downloaded again" in out
    assert broken.read_bytes() == good and [url.rsplit("/", 1)[1] for url in asked] == [broken.name]

    # Only the folder the dataset is read from: a same-named file of another dataset beside it is not touched.
    other = tmp_path / broken.name
    other.write_bytes(b"MNIST's own file, say")
    code, out, err = run_cli(["download", "--data-dir", str(tmp_path), "--no-progress"], capsys)
    assert code == 0, err
    assert other.read_bytes() == b"MNIST's own file, say" and "downloaded again" not in out


def test_non_checkpoint_file(tmp_path: Path, capsys) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"layer.weight": torch.zeros(2)}, path)
    code, _, err = run_cli(["evaluate", str(path)], capsys)
    assert_one_line_error(code, err, "not a kmnist checkpoint")


def test_python_dash_m_and_help() -> None:
    result = subprocess.run([sys.executable, "-m", "kmnist", "train", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0
    for option in ("--data-dir", "--dataset", "--model", "--preset", "--epochs", "--batch-size", "--lr", "--seed",
                   "--device", "--out", "--config", "--resume"):
        assert option in result.stdout
    assert "(default: 0.001)" in result.stdout


def test_resume_from_cli_after_kill(data_dir: Path, tmp_path: Path) -> None:
    """kill -9 during epoch 2, then --resume: the same metrics as a run never interrupted."""
    import os
    import signal
    import time

    run_dir = tmp_path / "killed"
    base = [sys.executable, "-m", "kmnist", "train", "--data-dir", str(data_dir), "--skip-md5", "--epochs", "3",
            "--val-size", "100", "--batch-size", "16", "--threads", "1", "--no-progress"]
    process = subprocess.Popen([*base, "--out", str(run_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run_dir / runs.LAST).exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert (run_dir / runs.LAST).exists()
    assert process.returncode == -signal.SIGKILL and len(runs.read_metrics(run_dir)) < 3  # killed before its end
    resumed = subprocess.run([*base, "--resume", str(run_dir)], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    whole = subprocess.run([*base, "--out", str(tmp_path / "whole")], capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr

    def strip(rows):
        return [{k: v for k, v in row.items() if not k.endswith("seconds")} for row in rows]

    assert strip(runs.read_metrics(run_dir)) == strip(runs.read_metrics(tmp_path / "whole"))
    assert (run_dir / "summary.json").is_file() and (run_dir / "confusion_matrix.png").is_file()
    # The same command once more: the run has ended, so nothing is trained, evaluated or rewritten.
    written = {path.name: path.stat().st_mtime_ns for path in run_dir.iterdir()}
    again = subprocess.run([*base, "--resume", str(run_dir)], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "finished all 3 epochs already: nothing to resume" in again.stdout and "summary (" in again.stdout
    assert {path.name: path.stat().st_mtime_ns for path in run_dir.iterdir()} == written


def test_sigterm_stops_a_run_as_ctrl_c_does_and_the_advice_can_be_pasted(data_dir: Path, tmp_path: Path) -> None:
    import os
    import shlex
    import signal
    import time

    run_dir = tmp_path / "a run folder"  # a space: the printed command must quote it
    base = [sys.executable, "-m", "kmnist", "train", "--data-dir", str(data_dir), "--skip-md5", "--epochs", "30",
            "--val-size", "100", "--batch-size", "16", "--threads", "1", "--no-progress"]
    process = subprocess.Popen([*base, "--out", str(run_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.time() + 120
    while not (run_dir / runs.LAST).exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, err
    advice = err.strip().splitlines()[-1]
    assert "finished epochs are saved. Continue with: kmnist train --resume" in advice
    assert shlex.split(advice.split("Continue with: ")[1]) == ["kmnist", "train", "--resume", str(run_dir),
                                                               "--data-dir", str(data_dir), "--skip-md5",
                                                               "--threads", "1"]
    assert 1 <= len(runs.read_metrics(run_dir)) < 30


def test_ensemble_with_tta(data_dir: Path, tmp_path: Path, capsys) -> None:
    runs_made = []
    for seed in (0, 1):
        run_dir = tmp_path / f"seed{seed}"
        code, _, err = run_cli(["train", "--data-dir", str(data_dir), "--skip-md5", "--out", str(run_dir),
                                "--seed", str(seed), *SMALL], capsys)
        assert code == 0, err
        runs_made.append(str(run_dir / "best.pt"))
    code, out, err = run_cli(["evaluate", *runs_made, "--data-dir", str(data_dir), "--skip-md5", "--tta", "5",
                              "--json", "--out", str(tmp_path / "ens")], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["tta_views"] == 5 and len(result["checkpoints"]) == 2
    # What the ensemble adds, from each member scored alone with the same views.
    alone = []
    for checkpoint in runs_made:
        code, out_alone, err = run_cli(["evaluate", checkpoint, "--data-dir", str(data_dir), "--skip-md5", "--tta",
                                        "5", "--json", "--out", str(tmp_path / "alone")], capsys)
        assert code == 0, err
        alone.append(json.loads(out_alone)["accuracy"])
        assert "members" not in json.loads(out_alone)
    assert [m["accuracy"] for m in result["members"]] == pytest.approx(alone)
    assert result["gain_over_best_member_accuracy"] == pytest.approx(result["accuracy"] - max(alone))
    assert result["gain_over_member_mean_accuracy"] == pytest.approx(result["accuracy"] - sum(alone) / 2)
    wrong = 100 - min(alone)  # percent of images the worse member gets wrong bounds those both get wrong
    assert 0 <= result["errors_shared_by_all_members"] <= round(wrong * result["count"] / 100)
    code, out, err = run_cli(["evaluate", *runs_made, "--data-dir", str(data_dir), "--skip-md5", "--out",
                              str(tmp_path / "ens")], capsys)
    assert code == 0, err
    assert "members alone" in out and "over the best" in out
    assert (tmp_path / "ens" / "metrics.json").is_file()
    code, _, err = run_cli(["evaluate", runs_made[0], "--data-dir", str(data_dir), "--skip-md5", "--tta", "26"],
                           capsys)
    assert_one_line_error(code, err, "--tta")
    # Seed 1 trained on most of seed 0's validation images: scoring the pair there would be inflated.
    code, _, err = run_cli(["evaluate", *runs_made, "--split", "val", "--data-dir", str(data_dir), "--skip-md5",
                            "--out", str(tmp_path / "ens-val")], capsys)
    assert_one_line_error(code, err, "same validation split", "seed 0", "seed 1")
    code, _, err = run_cli(["evaluate", runs_made[0], runs_made[0], "--split", "val", "--data-dir", str(data_dir),
                            "--skip-md5", "--out", str(tmp_path / "ens-val")], capsys)
    assert code == 0, err
    # Other data files: the validation split rebuilt from them could hold images the model trained on.
    other = write_dataset(tmp_path / "other-data", seed=5)
    code, _, err = run_cli(["evaluate", runs_made[0], "--split", "val", "--data-dir", str(other), "--skip-md5",
                            "--out", str(tmp_path / "other-val")], capsys)
    assert_one_line_error(code, err, "was trained on other data files", "validation split cannot be rebuilt")
    code, _, err = run_cli(["evaluate", runs_made[0], "--data-dir", str(other), "--skip-md5", "--out",
                            str(tmp_path / "other-test")], capsys)
    assert code == 0, err  # a test split of other files is a fair test of any model
    # Without --out, each evaluation gets its own folder beside the first checkpoint: none replaces another.
    for extra in ([], ["--tta", "5"], [runs_made[1]], [runs_made[1], "--tta", "5"], ["--split", "val"]):
        code, _, err = run_cli(["evaluate", runs_made[0], *extra, "--data-dir", str(data_dir), "--skip-md5"], capsys)
        assert code == 0, err
    folders = sorted(p.name for p in (tmp_path / "seed0").glob("evaluation-*") if (p / "metrics.json").is_file())
    assert len(folders) == 5 and "evaluation-test-best" in folders and "evaluation-test-best-tta5" in folders


def test_bench_writes_json_and_markdown(data_dir: Path, tmp_path: Path, capsys) -> None:
    table = tmp_path / "benchmarks.md"
    for json_to in (str(tmp_path / "b.json"), None):  # a file, then (--json alone) stdout
        code, out, err = run_cli(["bench", "--data-dir", str(data_dir), "--skip-md5", "--repeats", "1",
                                  "--max-batches", "3", "--val-size", "100", "--threads", "1", "--markdown", str(table),
                                  "--model-arg", "token_hidden=32", "--json", *([json_to] if json_to else [])], capsys)
        assert code == 0, err
    assert json.loads(out)["speedup"] > 0 and "speed-up" in err  # stdout holds the JSON alone; the table: stderr
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["speedup"] > 0 and result["infer_images_per_second_batch1024"] > 0
    assert result["hardware"] and result["environment"]["torch"]
    lines = table.read_text().splitlines()
    assert sum(line.startswith("| date") for line in lines) == 1 and len(lines) == 4


def test_bench_of_a_full_recipe_without_a_validation_split(data_dir: Path, tmp_path: Path, capsys) -> None:
    table = tmp_path / "benchmarks.md"
    code, out, err = run_cli(["bench", "--data-dir", str(data_dir), "--skip-md5", "--repeats", "1", "--max-batches",
                              "2", "--full", "--epochs", "2", "--val-size", "0", "--threads", "1", "--no-compare",
                              "--json", str(tmp_path / "b.json"), "--markdown", str(table),
                              "--model-arg", "token_hidden=32", "--out", str(tmp_path / "recipe")], capsys)
    assert code == 0, err
    final = json.loads((tmp_path / "b.json").read_text())["recipe"]["final_test_acc"]
    assert f"{final:.2f}% (final epoch)" in out and f"{final:.2f}% (final epoch)" in table.read_text()
    # A --markdown file a row cannot be added to is refused before any timing.
    table.write_bytes(b"# Benchmarks \xe9t\xe9\n")
    code, out, err = run_cli(["bench", "--data-dir", str(data_dir), "--skip-md5", "--markdown", str(table)], capsys)
    assert_one_line_error(code, err, "not a UTF-8 text file")
    assert "benchmarking" not in out
    # A run folder already used: bench has no --resume to offer.
    code, out, err = run_cli(["bench", "--data-dir", str(data_dir), "--skip-md5", "--full", "--out",
                              str(tmp_path / "recipe")], capsys)
    assert_one_line_error(code, err, "already holds a run; choose another --out (bench --full trains a new one)")


def test_the_benchmark_label_names_what_was_timed() -> None:
    from kmnist.cli import bench_label
    from kmnist.config import resolve_config

    assert bench_label(resolve_config(), None) == "report-mixer"
    assert bench_label(resolve_config(file_values={"model_args": {"patch": 7}}), None) == "report-mixer patch=7"
    widened = resolve_config(preset="cnn-fast-cpu", overrides={"model_args": {"width": 24}})
    assert bench_label(widened, "cnn-fast-cpu") == "cnn-fast-cpu width=24"
    other = resolve_config(preset="report-row1", overrides={"model": "resnet-small"})
    assert bench_label(other, "report-row1") == "resnet-small (preset report-row1, model changed)"
    k49 = resolve_config(preset="quick-cnn", overrides={"dataset": "k49", "batch_size": 64})
    assert bench_label(k49, "quick-cnn") == "quick-cnn dataset=k49 batch_size=64"


def test_the_benchmark_row_keeps_the_mark_of_uncommitted_code() -> None:
    from kmnist.bench import short_revision

    assert short_revision("87a4aaace72b5a6ec1f3e3d5e2a4ff0ad7d3f2b1-dirty") == "87a4aaace72b-dirty"
    assert short_revision("87a4aaace72b5a6ec1f3e3d5e2a4ff0ad7d3f2b1") == "87a4aaace72b" and short_revision(None) == "-"


def test_bench_with_compile_times_the_uncompiled_loop_beside_it(data_dir: Path, tmp_path: Path, capsys) -> None:
    code, out, err = run_cli(["bench", "--data-dir", str(data_dir), "--skip-md5", "--repeats", "1",
                              "--max-batches", "2", "--val-size", "120", "--threads", "1", "--batch-size", "32",
                              "--model", "resnet-small", "--model-arg", "width=4", "--model-arg", "depth=0",
                              "--compile", "default", "--json", str(tmp_path / "b.json"),
                              "--markdown", str(tmp_path / "b.md")], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "b.json").read_text())
    assert set(result["median_epoch_seconds"]) == {"tensor", "eager", "per-sample"}
    assert result["compile"]["warm_up_seconds"] > 0 and result["compile"]["speedup_over_eager"] > 0
    assert "speed-up from compiling" in out
    row = (tmp_path / "b.md").read_text().splitlines()[-1]
    assert re.search(r"\| resnet-small depth=0 width=4 batch_size=32 \| auto \((fp32|bf16)\), compile default \|", row), row
    assert "| 1 (2 batches of " in row and ", scaled) |" in row  # --max-batches: epochs cut short, then scaled


def test_time_left_is_the_mean_pace_times_the_epochs_to_go() -> None:
    assert cli.time_left([10.0, 20.0], epoch=2, epochs=5) == 45.0
    assert cli.time_left([7.0], epoch=4, epochs=4) == 0.0  # resumed at the last epoch: only this process's pace
    assert cli.format_duration(3725.9) == "1:02:05"


def test_ensemble_gain_counts_what_members_get_wrong() -> None:
    from kmnist.evaluate import ensemble_gain

    labels = torch.tensor([0, 0, 0, 1])
    predictions = [torch.tensor([1, 0, 1, 1]), torch.tensor([1, 1, 0, 1])]  # both wrong on the first image only
    ensemble = {"accuracy": 75.0, "balanced_accuracy": 100 * (2 / 3 + 1) / 2}
    gain = ensemble_gain(ensemble, predictions, labels, 2, ["a.pt", "b.pt"])
    assert [m["accuracy"] for m in gain["members"]] == [50.0, 50.0]
    # Balanced: class 0 right 1 of 3 and class 1 right 1 of 1 -> (33.3 + 100) / 2 for each member.
    assert [m["balanced_accuracy"] for m in gain["members"]] == pytest.approx([100 * (1 / 3 + 1) / 2] * 2)
    assert gain["errors_shared_by_all_members"] == 1
    assert gain["gain_over_best_member_accuracy"] == 25.0 and gain["gain_over_member_mean_accuracy"] == 25.0
    assert gain["gain_over_best_member_balanced_accuracy"] == pytest.approx(100 / 6)  # 83.3 - 66.7


def test_models_lists_every_model_and_preset_with_the_options_it_stands_for(capsys) -> None:
    from kmnist.config import PRESETS, resolve_config
    from kmnist.models import create_model, list_models

    code, out, err = run_cli(["models", "--json"], capsys)
    assert code == 0, err
    listed = json.loads(out)
    assert [model["name"] for model in listed["models"]] == list_models()
    assert [preset["name"] for preset in listed["presets"]] == sorted(PRESETS)
    for model in listed["models"]:
        assert model["summary"] and "\n" not in model["summary"]
        assert model["parameters"] == sum(p.numel() for p in create_model(model["name"]).parameters())
    parser = cli.build_parser()
    for preset in listed["presets"]:
        # The printed options, given to `kmnist train` without the preset, configure the same training.
        args = parser.parse_args(["train", *preset["options"]])
        assert cli.config_from_args(args) == resolve_config(preset=preset["name"]), preset["name"]
    assert next(p for p in listed["presets"] if p["name"] == "report-final")["options"] == []
    code, out, err = run_cli(["models"], capsys)
    assert code == 0 and "mixer-best: all-MLP, no convolution" in out and "1.24 M parameters" in out


def test_output_into_a_closed_pipe_ends_quietly() -> None:
    """`kmnist models | head -3`: the reader goes away before the output is written; no traceback."""
    import signal

    process = subprocess.Popen([sys.executable, "-m", "kmnist", "models"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # the reader is gone before kmnist writes a line
    err = process.stderr.read()
    assert process.wait(timeout=120) == 128 + signal.SIGPIPE
    assert err == ""


def test_a_failed_write_names_the_file_it_was_writing(tmp_path: Path) -> None:
    import errno

    from kmnist.checkpoint import atomic_torch_save
    from kmnist.files import atomic_writer

    with pytest.raises(OSError) as caught:
        with atomic_writer(tmp_path / "out.txt", "w") as out:
            out.write("a")
            raise OSError(errno.ENOSPC, "No space left on device")  # as a write to a full disk fails: no file named
    assert caught.value.filename == str(tmp_path / "out.txt") and caught.value.errno == errno.ENOSPC

    class FullDisk:  # torch.save wraps the file's OSError in a RuntimeError
        def __getstate__(self):
            raise RuntimeError("unexpected pos") from OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as caught:
        atomic_torch_save({"x": FullDisk()}, tmp_path / "last.pt")
    assert caught.value.filename == str(tmp_path / "last.pt") and caught.value.strerror == "No space left on device"
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


def test_a_full_disk_is_one_line_and_the_run_can_be_resumed(data_dir: Path, tmp_path: Path) -> None:
    import resource

    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "kmnist", "train", "--data-dir", str(data_dir), "--skip-md5", "--epochs", "2",
               "--val-size", "100", "--batch-size", "32", "--threads", "1", "--no-progress", "--out", str(run_dir)]
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # noqa: E731  a checkpoint is more
    full = subprocess.run(command, capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert_one_line_error(full.returncode, full.stderr, "kmnist train: error:", str(run_dir), "File too large")
    assert not [path.name for path in run_dir.iterdir() if path.name.endswith(".part")]
    resumed = subprocess.run([*command[:-2], "--resume", str(run_dir)], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert [row["epoch"] for row in runs.read_metrics(run_dir)] == [1, 2]


def test_a_run_is_trained_by_one_process_at_a_time(data_dir: Path, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    base = ["train", "--data-dir", str(data_dir), "--skip-md5", "--val-size", "100", "--threads", "1", "--no-progress"]
    code, _, err = run_cli([*base, "--epochs", "2", "--out", str(run_dir)], capsys)
    assert code == 0, err
    summary = run_dir / runs.SUMMARY
    summary.unlink()  # as if cut off after its last epoch
    (run_dir / ".last.pt.x1y2.part").write_bytes(b"half a checkpoint of a process killed mid-write")
    with runs.training_lock(run_dir):  # another process trains it now
        code, _, err = run_cli([*base, "--resume", str(run_dir)], capsys)
        assert_one_line_error(code, err, "is being trained by another process")
    code, _, err = run_cli([*base, "--resume", str(run_dir)], capsys)
    assert code == 0, err
    assert summary.is_file() and not list(run_dir.glob(".*.part"))


@pytest.mark.parametrize("content", ["[]", "null", '"x"'])
def test_a_config_json_that_is_not_an_object_is_one_line(data_dir: Path, tmp_path: Path, capsys,
                                                         content: str) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / runs.CONFIG).write_text(content)
    for extra in ([], ["--epochs", "4"]):
        code, _, err = run_cli(["train", "--data-dir", str(data_dir), "--skip-md5", "--resume", str(tmp_path / "run"),
                                *extra], capsys)
        assert_one_line_error(code, err, "not a run record (a JSON object)")


def test_the_benchmark_row_names_a_per_sample_side_in_bf16() -> None:
    from kmnist.bench import markdown_row

    result = {"date": "2026-12-02", "name": "report-mixer", "precision": "auto", "bf16": True, "hardware": "CPU",
              "median_epoch_seconds": {"tensor": 9.0, "per-sample": 20.0}, "speedup": 20 / 9,
              "baseline_precision": "bf16", "eval_seconds": 0.5, "train_images_per_second": 6111,
              "infer_images_per_second_batch1": 800, "infer_images_per_second_batch1024": 25000, "repeats": 3,
              "batches_timed_per_epoch": 430, "batches_per_epoch": 430, "git_revision": None}
    row = markdown_row(result)
    assert "| auto (bf16); per-sample in bf16 |" in row and "| 3 | - |" in row
    assert "per-sample in" not in markdown_row({**result, "baseline_precision": "fp32"})


def test_command_line_defaults_are_the_library_defaults() -> None:
    import inspect

    from kmnist import config, data
    from kmnist.evaluate import evaluate_checkpoints
    from kmnist.export import export_checkpoint
    from kmnist.imageprep import Limits
    from kmnist.predict import predict_files
    from kmnist.serve import ServeOptions

    def default(function, name):
        return inspect.signature(function).parameters[name].default

    assert set(config.DATASETS) == set(data.DATASETS)
    parser = cli.build_parser()
    predict = parser.parse_args(["predict", "ckpt.pt", "image.png"])
    assert predict.max_file_mb * 2**20 == Limits().max_bytes and predict.max_megapixels * 1e6 == Limits().max_pixels
    assert predict.batch_size == default(predict_files, "batch_size")
    serve = parser.parse_args(["serve", "ckpt.pt"])
    options = ServeOptions()
    assert serve.max_upload_mb * 2**20 == options.max_upload_bytes and serve.max_megapixels * 1e6 == options.max_pixels
    assert serve.top_k == options.top_k
    assert parser.parse_args(["evaluate", "ckpt.pt"]).batch_size == default(evaluate_checkpoints, "batch_size")
    export = parser.parse_args(["export", "ckpt.pt", "--onnx", "m.onnx"])
    assert (export.batch_size, export.tolerance) == (default(export_checkpoint, "batch_size"),
                                                     default(export_checkpoint, "tolerance"))


def test_a_stop_that_a_library_turns_into_an_error_of_its_own_is_an_interruption(data_dir: Path, tmp_path: Path,
                                                                                  monkeypatch, capsys) -> None:
    import kmnist.runner

    def cut_off_import(*args, **kwargs):  # Ctrl-C while matplotlib's backend is being imported
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as stop:
            raise ImportError("initialization failed") from stop

    real_figures = kmnist.runner.write_run_figures
    monkeypatch.setattr(kmnist.runner, "write_run_figures", cut_off_import)
    run_dir = tmp_path / "run"
    common = ["--data-dir", str(data_dir), "--skip-md5"]
    code, out, err = run_cli(["train", *common, "--out", str(run_dir), *SMALL], capsys)
    assert code == 130 and "Traceback" not in err, err
    assert "interrupted; finished epochs are saved. Continue with: kmnist train --resume" in err
    monkeypatch.setattr(kmnist.runner, "write_run_figures", real_figures)
    code, out, err = run_cli(["train", "--resume", str(run_dir), *common], capsys)
    assert code == 0, err
    assert (run_dir / "learning_curves.png").is_file()
    monkeypatch.setattr("kmnist.report.write_report", cut_off_import)  # any other command: one line, 130
    code, out, err = run_cli(["report", str(run_dir)], capsys)
    assert code == 130 and err.strip() == "kmnist report: interrupted"


def test_evaluate_scores_in_the_precision_each_checkpoint_trained_in(tiny_checkpoint: Path, data_dir: Path,
                                                                     tmp_path: Path, capsys) -> None:
    payload = torch.load(tiny_checkpoint, weights_only=True)
    payload["config"]["precision"] = "fp32"
    fp32 = tmp_path / "fp32.pt"
    torch.save(payload, fp32)
    common = ["--data-dir", str(data_dir), "--skip-md5", "--json"]
    results = {}
    for name, extra in (("own", []), ("asked-fp32", ["--precision", "fp32"]), ("asked-bf16", ["--precision", "bf16"])):
        code, out, err = run_cli(["evaluate", str(fp32), *common, "--out", str(tmp_path / name), *extra], capsys)
        assert code == 0, err
        results[name] = json.loads(out)
    assert results["own"]["precision"] == results["asked-fp32"]["precision"] == ["fp32"]
    assert results["own"]["accuracy"] == results["asked-fp32"]["accuracy"]
    assert results["asked-bf16"]["precision"] == ["bf16"]
    code, out, err = run_cli(["evaluate", str(fp32), str(tiny_checkpoint), *common, "--out", str(tmp_path / "both")],
                             capsys)
    assert code == 0, err
    assert json.loads(out)["precision"][0] == "fp32" and len(json.loads(out)["precision"]) == 2


def test_evaluate_finds_an_unwritable_results_folder_before_the_work_and_leaves_no_empty_one(
        tiny_checkpoint: Path, tmp_path: Path, offline: None, monkeypatch, capsys) -> None:
    import shutil

    checkpoint = tmp_path / "run" / "best.pt"
    checkpoint.parent.mkdir()
    shutil.copy(tiny_checkpoint, checkpoint)
    code, _, err = run_cli(["evaluate", str(checkpoint), "--data-dir", str(tmp_path / "no-data")], capsys)
    assert_one_line_error(code, err, "kmnist files missing")
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["best.pt"]  # no empty evaluation-test-best
    code, _, err = run_cli(["evaluate", str(tmp_path / "typo" / "run" / "best.pt"), "--data-dir", str(tmp_path)],
                           capsys)
    assert code != 0 and not (tmp_path / "typo").exists()  # a mistyped path leaves none of its folders behind

    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if self.name.startswith("evaluation-"):
            raise PermissionError(1, "Operation not permitted", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    code, _, err = run_cli(["evaluate", str(checkpoint), "--data-dir", str(tmp_path / "no-data")], capsys)
    assert_one_line_error(code, err, "evaluation-test-best: Operation not permitted; name a folder for the results "
                                     "with --out DIR")


def test_evaluate_warns_when_a_bf16_checkpoint_would_run_emulated(tiny_checkpoint: Path, data_dir: Path,
                                                                  tmp_path: Path, monkeypatch, capsys) -> None:
    import kmnist.evaluate

    monkeypatch.setattr(kmnist.evaluate, "emulates_bf16", lambda device, precision: precision == "bf16")
    code, _, err = run_cli(["evaluate", str(tiny_checkpoint), "--data-dir", str(data_dir), "--skip-md5", "--precision",
                            "bf16", "--out", str(tmp_path / "e")], capsys)
    assert code == 0 and "emulated, many times slower; --precision fp32 is faster" in err
    code, _, err = run_cli(["evaluate", str(tiny_checkpoint), "--data-dir", str(data_dir), "--skip-md5", "--precision",
                            "fp32", "--out", str(tmp_path / "f")], capsys)
    assert code == 0 and "emulated" not in err


def test_epoch_bars_draw_a_bar_per_epoch_gone_before_the_epochs_line(monkeypatch) -> None:
    import tqdm

    from kmnist.cli import EpochBars
    from kmnist.train import StepEvent

    bars = []

    class Bar:  # records what the bars are asked to show
        def __init__(self, total: int, desc: str, disable: bool | None, **kwargs) -> None:
            self.total, self.desc, self.disable, self.n, self.postfix, self.closed = total, desc, disable, 0, {}, False
            bars.append(self)

        def update(self) -> None:
            self.n += 1

        def set_postfix(self, **values) -> None:
            self.postfix = values

        def close(self) -> None:
            self.closed = True

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    draw = EpochBars(20)
    for epoch in (7, 8):  # a resumed run starts part-way
        for step in (1, 2, 3):
            draw(StepEvent(epoch, step, 3, 0.25 * epoch if step == 2 else None))
            assert bars[-1].closed is (step == 3)
    assert [(bar.desc, bar.total, bar.n, bar.postfix, bar.disable) for bar in bars] == [
        ("epoch 7/20", 3, 3, {"loss": "1.7500"}, None), ("epoch 8/20", 3, 3, {"loss": "2.0000"}, None)]


def test_an_error_in_option_terms_stays_the_same_kind() -> None:
    from kmnist.cli import in_option_terms
    from kmnist.errors import DataError, KmnistError

    error = DataError("val_size must be between 0 and 9, got 10")
    translated = in_option_terms(error, ["seed", "val_size"])
    assert type(translated) is DataError and str(translated) == "--val-size must be between 0 and 9, got 10"
    assert in_option_terms(error, ["seed"]) is error  # not given on the command line: its own words
    assert str(in_option_terms(KmnistError("val_sizes are odd"), ["val_size"])) == "val_sizes are odd"
