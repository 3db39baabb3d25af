"""The run directory: its file layout, and reading and writing the files a run leaves behind."""

from __future__ import annotations

import csv
import fcntl
import json
import math
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from kmnist.errors import KmnistError
from kmnist.files import atomic_writer

CONFIG = "config.json"
METRICS = "metrics.csv"
SUMMARY = "summary.json"
ENVIRONMENT = "environment.json"
LAST = "last.pt"
BEST = "best.pt"
# An epoch's new best.pt waits here until the epoch's last.pt and metrics.csv are written, then replaces best.pt:
# a run killed in between never keeps a best.pt of an epoch it will train again (rounded differently, if it
# resumes under other placement). On resume, one of the last finished epoch is put in place, any other dropped.
BEST_PENDING = ".best.pt.pending"
PREDICTIONS = "test_predictions.npz"
LOCK = ".lock"  # held by the process that trains the run

METRIC_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_bal_acc", "test_loss", "test_acc",
                  "test_bal_acc", "lr", "epoch_seconds", "eval_seconds", "compile_seconds")
# What every run's table has held (balanced accuracies and compile time came later, and runs without a
# validation split once left its columns out): the learning curves need these.
REQUIRED_METRIC_COLUMNS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc")


def atomic_write_text(path: str | Path, text: str, exclusive: bool = False) -> None:
    with atomic_writer(path, "w", exclusive=exclusive) as out:
        out.write(text)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Holds Ctrl-C and SIGTERM back until the block ends, then delivers the first to arrive to its own
    handler: files written together (a checkpoint and the metrics that describe it) are never left one
    epoch apart. Only the main thread receives signals; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, lambda signum, frame: caught.append(signum)) for signum in held}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if caught:
            signal.raise_signal(caught[0])


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_json(path: Path, data: Any, exclusive: bool = False) -> None:
    """Write `data` as JSON, atomically; exclusive: only if `path` does not exist yet (else FileExistsError)."""
    atomic_write_text(path, json.dumps(_jsonable(data), indent=2, ensure_ascii=False) + "\n", exclusive)


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:  # a file cut short or edited by hand
        raise KmnistError(f"{path}: not readable JSON ({getattr(error, 'msg', error)})") from None


@contextmanager
def training_lock(run_dir: Path) -> Iterator[None]:
    """Hold <run>/.lock while this process trains the run: a second process on the same run is refused."""
    handle = open(Path(run_dir) / LOCK, "a")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise KmnistError(f"{run_dir} is being trained by another process; wait for it to end, or stop it "
                              "and resume it") from None
        for stale in Path(run_dir).glob(".*.part"):  # half-written files of a process killed mid-write
            stale.unlink(missing_ok=True)
        yield
    finally:
        handle.close()  # and with it the lock


def read_record(path: Path) -> dict[str, Any]:
    """A JSON file that holds one object (a run's config, summary or environment; a sweep's record)."""
    record = read_json(path)
    if not isinstance(record, dict):
        raise KmnistError(f"{path}: not a run record (a JSON object), but {type(record).__name__} {record!r:.40}")
    return record


def write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """metrics.csv, one row per finished epoch (rewritten whole, atomically, after each epoch)."""
    lines = [",".join(METRIC_COLUMNS)]
    for row in history:
        lines.append(",".join("" if row.get(c) is None or (isinstance(row.get(c), float) and math.isnan(row[c]))
                              else f"{row[c]:.6g}" if isinstance(row[c], float) else str(row[c])
                              for c in METRIC_COLUMNS))
    atomic_write_text(Path(run_dir) / METRICS, "\n".join(lines) + "\n")


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    path = Path(run_dir) / METRICS
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            rows = [{k: (float(v) if v != "" else float("nan")) if k != "epoch" else int(v) for k, v in row.items()}
                    for row in reader]
    except (ValueError, TypeError, UnicodeDecodeError) as error:  # a value that is not a number, a short row
        raise KmnistError(f"{path}: not a readable metrics table ({error})") from None
    missing = [column for column in REQUIRED_METRIC_COLUMNS if reader.fieldnames and column not in reader.fieldnames]
    if missing:  # an empty file is a run before its first epoch; a header without these is not a run's table
        raise KmnistError(f"{path}: not a readable metrics table (no column {', '.join(missing)})")
    return rows


def summarize(history: list[dict[str, Any]], select_on: str = "val_acc") -> dict[str, Any]:
    """The report's summary, plus the honest numbers: the epoch is chosen on validation, not test.

    `select_on` is the validation column that picks the best epoch: val_acc, or val_bal_acc for an
    imbalanced dataset (K49). Balanced accuracies (mean of per-class accuracies) sit beside accuracies.
    """
    if not history:
        return {}
    last = history[-1]
    nan = float("nan")
    has_val = any(not math.isnan(row[select_on]) for row in history)
    # Earliest epoch with the best validation score (the one best.pt holds).
    best = max(history, key=lambda row: (row[select_on], -row["epoch"])) if has_val else last
    top_test = max(history, key=lambda row: (row["test_acc"], -row["epoch"]))
    return {
        "epochs": last["epoch"],
        "selected_on": select_on if has_val else None,
        "final_test_acc": last["test_acc"],
        "final_test_bal_acc": last.get("test_bal_acc", nan),
        "final_train_loss": last["train_loss"],
        "final_train_acc": last["train_acc"],
        "best_val_acc": best["val_acc"] if has_val else None,
        "best_val_bal_acc": best.get("val_bal_acc", nan) if has_val else None,
        "best_epoch": best["epoch"] if has_val else None,
        "test_acc_at_best_val": best["test_acc"] if has_val else None,
        "test_bal_acc_at_best_val": best.get("test_bal_acc", nan) if has_val else None,
        "max_test_acc": top_test["test_acc"],  # test-selected: reported as the report did, not a fair estimate
        "max_test_epoch": top_test["epoch"],
        "train_seconds": sum(row["epoch_seconds"] for row in history),
        "seconds_per_epoch": sum(row["epoch_seconds"] for row in history) / len(history),
        "eval_seconds": sum(row.get("eval_seconds", 0.0) for row in history),
        # torch.compile before the first epoch (--compile), outside train_seconds as the warm-up of a benchmark is.
        "compile_seconds": sum(row.get("compile_seconds", 0.0) for row in history
                               if not math.isnan(row.get("compile_seconds", 0.0))),
    }
