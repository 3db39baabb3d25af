"""The `kmnist` command line: thin glue from options to configs and library calls."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import math
import os
import re
import shlex
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from kmnist import __version__
from kmnist.config import (DATASETS, DEVICES, FIELDS, PLACEMENT_FIELDS, PRECISIONS, PRESETS, TrainConfig,
                           load_config_file, option_flag, parse_scalar, resolve_config, split_preset)
from kmnist.errors import KmnistError, KmnistWarning, interrupted
from kmnist.files import atomic_writer, machine_error

if TYPE_CHECKING:  # torch loads only for the commands that need it
    from kmnist.train import StepEvent

EPOCH_COLUMNS = (("epoch", "{:>5}"), ("train_loss", "{:>10.4f}"), ("train_acc", "{:>9.2f}"), ("val_loss", "{:>8.4f}"),
                 ("val_acc", "{:>7.2f}"), ("test_acc", "{:>8.2f}"), ("lr", "{:>8.1e}"), ("epoch_seconds", "{:>7.1f}"))
# For an imbalanced dataset (K49) the balanced accuracies stand beside the accuracies.
BALANCED_EPOCH_COLUMNS = (EPOCH_COLUMNS[:5] + (("val_bal_acc", "{:>11.2f}"),) + EPOCH_COLUMNS[5:6]
                          + (("test_bal_acc", "{:>12.2f}"),) + EPOCH_COLUMNS[6:])


NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line on stderr and exit 2."""

    commands: dict[str, argparse.ArgumentParser] = {}  # the top-level parser's subcommands (build_parser)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # No abbreviations (--ep for --epochs): one would change meaning, silently, when a new option shares it.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        # A negative number in scientific notation is a value, not an option: `--weight-decay -5e-4` (argparse
        # before Python 3.13 knew only -5 and -0.5).
        self._negative_number_matcher = NEGATIVE_NUMBER

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_number(text: str) -> float:
    """argparse type: a finite number above 0 (size limits)."""
    value = finite_number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def non_negative_number(text: str) -> float:
    """argparse type: a finite number of at least 0 (a tolerance; 0 asks for exact equality)."""
    value = finite_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text!r}")
    return value


def finite_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


# ---------------------------------------------------------------------------------------------
# shared options


def add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", metavar="DIR",
                        help="folder of the dataset files (else $KMNIST_DATA, else the user cache folder)")
    parser.add_argument("--skip-md5", action="store_true",
                        help="accept files whose md5 differs from the official release (your own files in the "
                             "official format); their structure is still checked")


def add_config_options(parser: argparse.ArgumentParser, help_of: dict[str, str] | None = None) -> None:
    """One option per TrainConfig field, defaults shown; unset options leave the config untouched. `help_of`
    replaces a field's help text where the command gives it another meaning."""
    defaults = TrainConfig()
    group = parser.add_argument_group("training configuration (defaults: the report's final configuration)")
    group.add_argument("--preset", choices=sorted(PRESETS),
                       help="start from a named configuration (`kmnist models` says what each is and sets)")
    group.add_argument("--config", metavar="FILE", help="TOML or YAML file of config fields; options here override it")
    for name, field in FIELDS.items():
        if name == "model_args":
            continue
        flag = option_flag(name)
        default = getattr(defaults, name)
        help_text = (help_of or {}).get(name) or f"{field.metadata.get('help', '')} (default: {default})"
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(flag, metavar=type(default).__name__.upper(), default=None, help=help_text)
    group.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="override a model argument, e.g. --model-arg patch=7 (repeatable; see `kmnist models`)")


def parse_key_values(items: Sequence[str], what: str) -> dict[str, Any]:
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise KmnistError(f"{what} must look like KEY=VALUE, got {item!r}")
        values[key.strip().replace("-", "_")] = parse_scalar(value)
    return values


def given_fields(args: argparse.Namespace) -> list[str]:
    """The config fields set by options on this command line."""
    return [name for name in FIELDS if name != "model_args" and getattr(args, name, None) is not None]


def in_option_terms(error: KmnistError, fields: Sequence[str]) -> KmnistError:
    """The error in the words of the command line: `lr must be positive` -> `--lr must be positive` when the
    value came from --lr (a config file's value keeps its field name, which is what the file says)."""
    message = str(error)
    for name in sorted(fields, key=len, reverse=True):
        if message.startswith(f"{name} "):
            translated = copy.copy(error)  # the same kind of error (a DataError stays one), reworded
            translated.args = (option_flag(name) + message[len(name):],)
            return translated
    return error


# Config fields whose range depends on the data (the training split's size), checked once it is loaded.
CHECKED_WITH_DATA = ("val_size",)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = {name: getattr(args, name) for name in FIELDS if name != "model_args"}
    file_values = load_config_file(args.config) if args.config else {}
    overrides["model_args"] = parse_key_values(args.model_arg, "--model-arg")
    try:
        return resolve_config(preset=args.preset, file_values=file_values, overrides=overrides)
    except KmnistError as error:
        raise in_option_terms(error, given_fields(args)) from None


def config_values_from_args(args: argparse.Namespace) -> tuple[str | None, dict[str, Any]]:
    """(preset, fixed config fields) as given by --preset, --config and options, not yet resolved (for sweeps)."""
    preset, values = split_preset(load_config_file(args.config) if args.config else {}, args.preset)
    values.update({name: getattr(args, name) for name in given_fields(args)})
    model_args = parse_key_values(args.model_arg, "--model-arg")
    if model_args:
        values["model_args"] = {**(values.get("model_args") or {}), **model_args}
    return preset, values


def data_dir_from_args(args: argparse.Namespace) -> Path:
    from kmnist.data import default_data_dir

    path = Path(args.data_dir or os.environ.get("KMNIST_DATA") or default_data_dir())
    if path.exists() and not path.is_dir():
        source = "--data-dir" if args.data_dir else "$KMNIST_DATA" if os.environ.get("KMNIST_DATA") else "data folder"
        raise KmnistError(f"{source} {path} is a file, not a folder")
    return path


def check_output_file(path_text: str | None, option: str) -> None:
    """Before minutes of work: a one-line error where an output file named by `option` could not be written."""
    if not path_text:
        return
    path = Path(path_text)
    if path.is_dir():
        raise KmnistError(f"{option} {path} is a folder; name a file")
    check_no_file_above(path, option)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A file made and removed, not os.access, which says yes to root even where no file can be made (/proc).
    try:
        handle, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
    except OSError as error:
        raise KmnistError(f"{option} {path}: cannot write in {path.parent} ({error.strerror or error})") from None
    os.close(handle)
    os.unlink(probe)


def check_output_folder(path_text: str | None, option: str) -> None:
    """Before any work: a one-line error where the folder named by `option` is a file, or lies below one."""
    if not path_text:
        return
    path = Path(path_text)
    if path.exists() and not path.is_dir():
        raise KmnistError(f"{option} {path} is a file, not a folder")
    check_no_file_above(path, option)


def claim_new_folder(path: Path) -> tuple[Path, list[Path]]:
    """Create path, else path-2, path-3, ... (whichever is free first; mkdir is atomic, so processes started at
    the same moment never share one). Returns it and the folders created, deepest last."""
    created = [folder for folder in reversed(path.parents) if not folder.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    folder, number = path, 1
    while True:
        try:
            folder.mkdir()
            return folder, [*created, folder]
        except FileExistsError:
            number += 1
            folder = path.with_name(f"{path.name}-{number}")


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove what claim_new_folder created, deepest first, as far as the folders are still empty."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:  # not empty (something else was written there), or gone
            return


def check_no_file_above(path: Path, option: str) -> None:
    """A file where one of path's folders should be names itself ("taken is a file"), not a bare "File exists"."""
    for folder in path.parents:
        if folder.exists() and not folder.is_dir():
            raise KmnistError(f"{option} {path}: {folder} is a file, not a folder")


def check_device(config: TrainConfig) -> None:
    """Before any work: a one-line error where the config cannot train here, a warning where bf16 runs emulated."""
    from kmnist.metrics import emulates_bf16
    from kmnist.train import training_device

    if emulates_bf16(training_device(config), config.precision):
        print("kmnist: warning: this CPU has no bf16 matrix units (AMX or AVX512-BF16), so --precision bf16 runs "
              "emulated, many times slower than fp32 (--precision auto picks fp32 here)", file=sys.stderr)


def show_progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "no_progress", False)


class EpochBars:
    """A progress bar per training epoch (on a terminal only), fed by `train.fit`'s steps."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs
        self.bar: Any = None

    def __call__(self, event: StepEvent) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=event.steps, desc=f"epoch {event.epoch}/{self.epochs}", leave=False, unit="batch",
                            disable=None, dynamic_ncols=True)
        self.bar.update()
        if event.loss is not None:
            self.bar.set_postfix(loss=f"{event.loss:.4f}")
        if event.step == event.steps:  # gone before the epoch's line is printed
            self.bar.close()
            self.bar = None


# ---------------------------------------------------------------------------------------------
# commands


def cmd_download(args: argparse.Namespace) -> int:
    from kmnist.data import fetch, get_spec, locate, read_dataset, repair

    data_dir = data_dir_from_args(args)
    spec = get_spec(args.dataset)
    if args.format == "all":
        formats = list(spec.formats)
    elif args.format:
        formats = [args.format]
    else:  # the format already there, else the one the release is fetched in
        found = locate(spec, data_dir)
        formats = [found[0] if found else spec.download_format]
    for fmt in formats:
        if fmt not in spec.formats:
            raise KmnistError(f"{spec.name} is released as {', '.join(spec.formats)}, not {fmt}")
    for fmt in formats:
        if not args.skip_md5:  # a file cut short or corrupted is fetched again, not only reported
            for what in repair(spec, data_dir, fmt, progress=show_progress(args)):
                print(f"{what}: downloaded again and verified")
        fmt, folder = fetch(spec, data_dir, fmt, progress=show_progress(args))
        dataset = read_dataset(spec, fmt, folder, check_md5=not args.skip_md5)  # every file of this format
        print(f"{spec.name} ({fmt}): {len(dataset.train)} train and {len(dataset.test)} test images, "
              f"{dataset.num_classes} classes, {'not md5-checked' if args.skip_md5 else 'verified'}, in {folder}")
    return 0


def format_row(row: dict[str, Any], columns: tuple = EPOCH_COLUMNS) -> str:
    """One epoch's line; a score that was not measured (no validation split: NaN) shows as a dash."""
    return " ".join(f"{'-':>{len(fmt.format(0))}}" if isinstance(row[name], float) and math.isnan(row[name])
                    else fmt.format(row[name]) for name, fmt in columns)


def format_header(columns: tuple = EPOCH_COLUMNS) -> str:
    return " ".join(f"{name.replace('_seconds', '_s'):>{len(fmt.format(0))}}" for name, fmt in columns)


def print_summary(summary: dict[str, Any], run_dir: Path, balanced: bool = False) -> None:
    """The run's summary; `balanced`: the dataset is scored by balanced accuracy (K49), also where no validation
    split chose the epoch."""
    def pct(value: Any) -> str:
        return "n/a" if value is None else f"{value:.2f}%"

    print(f"\nsummary ({run_dir}):")
    # Without a validation split nothing is chosen after training: the final epoch is the result.
    fixed = ("   <- the honest estimate (no validation split: the final epoch is the result)"
             if summary.get("best_epoch") is None else "")
    balanced = balanced or summary.get("selected_on") == "val_bal_acc"
    print(f"  final test accuracy          {pct(summary['final_test_acc'])}{'' if balanced else fixed}")
    print(f"  final training loss          {summary['final_train_loss']:.4f}")
    print(f"  final training accuracy      {pct(summary['final_train_acc'])}")
    if balanced:
        print(f"  final test balanced accuracy {pct(summary['final_test_bal_acc'])}{fixed}")
    if summary.get("selected_on") == "val_bal_acc":  # imbalanced dataset: chosen and scored on balanced accuracy
        print(f"  best validation balanced acc {pct(summary['best_val_bal_acc'])} (epoch {summary['best_epoch']}; "
              f"accuracy {pct(summary['best_val_acc'])})")
        print(f"  test balanced acc that epoch {pct(summary['test_bal_acc_at_best_val'])}   <- the honest estimate "
              f"(accuracy {pct(summary['test_acc_at_best_val'])})")
    elif summary["best_epoch"] is not None:
        print(f"  best validation accuracy     {pct(summary['best_val_acc'])} (epoch {summary['best_epoch']})")
        print(f"  test accuracy at that epoch  {pct(summary['test_acc_at_best_val'])}   <- the honest estimate")
    print(f"  maximum test accuracy        {pct(summary['max_test_acc'])} (epoch {summary['max_test_epoch']}; "
          "test-selected, as the report measured it)")
    print(f"  training time                {summary['train_seconds']:.1f} s "
          f"({summary['seconds_per_epoch']:.1f} s per epoch)"
          + (f"; compiling before it {summary['compile_seconds']:.1f} s" if summary.get("compile_seconds") else ""))


def same_file(given: str | None, saved: str | None) -> bool:
    if not given or not saved:
        return given == saved
    return Path(given).expanduser().absolute() == Path(saved).expanduser().absolute()


def check_resume_options(args: argparse.Namespace, config: TrainConfig, run_dir: Path) -> None:
    """With --resume, options may repeat the saved configuration (the same command again) but not change it."""
    from kmnist import runs

    if not run_dir.is_dir():
        raise KmnistError(f"cannot resume: no such run directory: {run_dir}")
    if not (run_dir / runs.CONFIG).is_file():
        raise KmnistError(f"cannot resume: {run_dir} holds no {runs.CONFIG}")
    saved = runs.read_record(run_dir / runs.CONFIG)
    given = [name for name in FIELDS if name not in PLACEMENT_FIELDS and name != "model_args"
             and getattr(args, name, None) is not None]
    if args.model_arg:
        given.append("model_args")
    if args.config or args.preset:  # these may set any field
        given = [name for name in FIELDS if name not in PLACEMENT_FIELDS]
    changed = [name for name in given if name not in ("model_args", "teacher") and getattr(config, name) != saved.get(name)]
    if "teacher" in given and not same_file(config.teacher, saved.get("teacher")):  # saved absolute, given relative
        changed.append("teacher")
    if "model_args" in given and not same_model_args(config.model, config.model_args, saved):
        changed.append("model_args")
    if changed:
        raise KmnistError(f"--resume continues {run_dir} with its saved configuration; these options differ from "
                          f"it: {', '.join(option_flag(name) for name in changed)}")


def same_model_args(model: str, model_args: dict[str, Any], saved: dict[str, Any]) -> bool:
    """Whether the given model arguments build what the saved run built (a default given explicitly or not)."""
    from kmnist.config import complete_model_args

    return model == saved.get("model") and (complete_model_args(model, model_args)
                                             == complete_model_args(model, saved.get("model_args") or {}))


def resume_command(args: argparse.Namespace, config: TrainConfig, run_dir: Path) -> str:
    """The command that continues an interrupted run as it ran, to paste as printed: the same data files and the
    same placement where it is not the default (e.g. --threads 1 of two runs side by side, which a resume would
    not otherwise keep)."""
    words = ["kmnist", "train", "--resume", str(run_dir)]
    if args.data_dir:
        words += ["--data-dir", str(args.data_dir)]
    if args.skip_md5:
        words.append("--skip-md5")
    defaults = TrainConfig()
    for name in PLACEMENT_FIELDS:
        if getattr(config, name) != getattr(defaults, name):
            words += [option_flag(name), str(getattr(config, name))]
    return shlex.join(words)


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from kmnist import runs
    from kmnist.data import is_balanced
    from kmnist.runner import prepare_run, train_run

    config = config_from_args(args)
    if args.resume:
        run_dir = Path(args.resume)
        if args.out and Path(args.out).resolve() != run_dir.resolve():
            raise KmnistError(f"--resume continues {run_dir} in place; --out {args.out} names another folder: "
                              "give one of them")
        check_resume_options(args, config, run_dir)
        config = prepare_run(config, run_dir, resume=True)  # the saved run (model, dataset, epochs, precision)
        if (run_dir / runs.SUMMARY).is_file():  # written last: the run ended; the same command again changes nothing
            summary = runs.read_record(run_dir / runs.SUMMARY)
            print(f"{run_dir} finished all {config.epochs} epochs already: nothing to resume")
            print_summary(summary, run_dir, balanced=is_balanced(config.dataset))
            return 0
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path(args.out or f"runs/{config.dataset}-{config.model}-{stamp}")
        check_output_folder(str(run_dir), "--out")
        if config.teacher:  # saved as an absolute path, so that --resume finds it from any folder
            config = dataclasses.replace(config, teacher=str(Path(config.teacher).expanduser().absolute()))
        # Model, arguments, teacher and the folder named by --out: before the banner.
        prepare_run(config, run_dir if args.out else None, resume=False)
    check_device(config)
    data_dir = data_dir_from_args(args)
    progress = show_progress(args)
    claimed: list[Path] = []
    if not args.resume and not args.out:  # runs started in the same second get folders of their own
        run_dir, claimed = claim_new_folder(run_dir)
    print(f"kmnist {__version__}: {'resuming' if args.resume else 'training'} {config.model} on {config.dataset}, "
          f"run directory {run_dir}", flush=True)
    columns = BALANCED_EPOCH_COLUMNS if is_balanced(config.dataset) else EPOCH_COLUMNS
    spent: list[float] = []  # seconds per epoch of this process, evaluation included

    def on_epoch(row: dict[str, Any]) -> None:
        if not spent:
            tqdm.write(format_header(columns) + f" {'left':>8}")
        spent.append(row["epoch_seconds"] + row["eval_seconds"])
        tqdm.write(format_row(row, columns) + f" {format_duration(time_left(spent, row['epoch'], config.epochs)):>8}")

    terminated = []

    def on_terminate(signum: int, frame: Any) -> None:  # `kill` stops a run as Ctrl-C does
        terminated.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_terminate)
    try:
        summary = train_run(config, run_dir, data_dir, resume=bool(args.resume), progress=progress,
                            on_step=EpochBars(config.epochs) if progress else None,
                            on_epoch=on_epoch, check_md5=not args.skip_md5)
    except BaseException as error:
        if not (run_dir / runs.CONFIG).exists():  # stopped before the run began: no empty folder left behind
            remove_empty_folders(claimed)
        if isinstance(error, KmnistError):  # the fields that can be checked only against the data
            translated = in_option_terms(error, [name for name in given_fields(args) if name in CHECKED_WITH_DATA])
            if translated is not error:
                raise translated from None
        if not interrupted(error):
            raise
        again = resume_command(args, config, run_dir)
        if (run_dir / runs.LAST).is_file():
            print(f"\ninterrupted; finished epochs are saved. Continue with: {again}", file=sys.stderr)
        elif (run_dir / runs.CONFIG).is_file():
            print(f"\ninterrupted before the first epoch ended; start it again with: {again}", file=sys.stderr)
        else:
            print("\ninterrupted before the run began; nothing was saved", file=sys.stderr)
        return 128 + terminated[0] if terminated else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print_summary(summary, run_dir, balanced=is_balanced(config.dataset))
    print(f"  files: {', '.join(sorted(p.name for p in run_dir.iterdir() if not p.name.startswith('.')))}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from kmnist.evaluate import evaluate_checkpoints

    check_output_folder(args.out, "--out")
    result = evaluate_checkpoints(args.checkpoints, data_dir_from_args(args), split=args.split,
                                  device=args.device or "auto", expected_model=args.model, out=args.out,
                                  batch_size=args.batch_size, check_md5=not args.skip_md5, tta=args.tta,
                                  precision=args.precision)
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    print(f"{result['split']} split of {result['dataset']}: {result['count']} images, "
          f"{len(result['checkpoints'])} checkpoint(s), {result['tta_views']} view(s) each, "
          f"{'/'.join(sorted(set(result['precision'])))}")
    print(f"  accuracy           {result['accuracy']:.2f}%")
    print(f"  balanced accuracy  {result['balanced_accuracy']:.2f}%")
    if "members" in result:
        for score, name in (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy")):
            print(f"  members alone      {name}: " + ", ".join(f"{m[score]:.2f}%" for m in result["members"])
                  + f"; the ensemble adds {result['gain_over_best_member_' + score]:+.2f} points over the best, "
                  f"{result['gain_over_member_mean_' + score]:+.2f} over their mean")
        print(f"  wrong in every member  {result['errors_shared_by_all_members']} of {result['count']} images")
    print("  per class          " + "  ".join(f"{name} {acc:.1f}" for name, acc in result["per_class_accuracy"].items()))
    print(f"  confusion matrix   {result['confusion_matrix_png']}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from kmnist import bench, runs
    from kmnist.data import load_dataset
    from kmnist.runinfo import environment, hardware_summary

    config = config_from_args(args)
    if args.repeats < 1 or (args.max_batches is not None and args.max_batches < 1):
        raise KmnistError("--repeats and --max-batches must be at least 1")
    check_device(config)
    to_stdout = args.json == "-"  # the JSON alone on stdout (for a pipe); the table goes to stderr then
    say = functools.partial(print, file=sys.stderr if to_stdout else sys.stdout, flush=True)
    if not to_stdout:
        check_output_file(args.json, "--json")
    check_output_file(args.markdown, "--markdown")
    if args.markdown:
        markdown_text(Path(args.markdown))  # a file a row cannot be appended to is found before the timing
    name = bench_label(config, args.preset)
    if args.full:  # its run folder, checked before the measurements rather than after them
        from kmnist.runner import RUN_FILES, prepare_run

        run_dir = Path(args.out or f"runs/bench-{(args.preset or config.model)}-{time.strftime('%Y%m%d-%H%M%S')}")
        check_output_folder(str(run_dir), "--out")
        if any((run_dir / name).exists() for name in RUN_FILES):  # bench has no --resume to suggest
            raise KmnistError(f"{run_dir} already holds a run; choose another --out (bench --full trains a new one)")
        prepare_run(config, run_dir, resume=False)
    dataset = load_dataset(config.dataset, data_dir_from_args(args), check_md5=not args.skip_md5)
    from kmnist.metrics import resolved_precision
    from kmnist.train import training_device

    resolved = resolved_precision(training_device(config), config.precision)
    precision = config.precision if config.precision == resolved else f"{config.precision}: {resolved} here"
    say(f"benchmarking {name} ({config.model}, batch {config.batch_size}, precision {precision}); "
        f"{args.repeats} run(s) of each measurement")
    result = bench.run_benchmark(config, dataset, args.repeats, args.max_batches, compare=not args.no_compare,
                                 baseline_precision=args.baseline_precision, progress=show_progress(args))
    env = environment()
    result.update(name=name, config=config.to_dict(), precision=config.precision, hardware=hardware_summary(env),
                  environment=env, git_revision=env["git_revision"], date=time.strftime("%Y-%m-%d"))
    if args.full:
        from kmnist.runner import train_run

        say(f"training the full recipe in {run_dir} ...")
        result["recipe"] = train_run(config, run_dir, data_dir_from_args(args), progress=show_progress(args),
                                     on_step=EpochBars(config.epochs) if show_progress(args) else None,
                                     check_md5=not args.skip_md5)
    medians = result["median_epoch_seconds"]
    ours = f"in-memory tensors, {'bf16' if result['bf16'] else 'fp32'}"
    rows = [(f"train epoch ({ours}{', compiled' if 'compile' in result else ''})", f"{medians['tensor']:.2f} s")]
    if "compile" in result:
        rows += [(f"train epoch ({ours}, not compiled)", f"{medians['eager']:.2f} s"),
                 (f"compiling ({config.compile}), before timing", f"{result['compile']['warm_up_seconds']:.1f} s"),
                 ("speed-up from compiling", f"{result['compile']['speedup_over_eager']:.2f}x")]
    if "per-sample" in medians:
        rows += [(f"train epoch (per-sample DataLoader, {result['baseline_precision']})", f"{medians['per-sample']:.2f} s"),
                 ("speed-up", f"{result['speedup']:.2f}x")]
    rows += [("training images/s", f"{result['train_images_per_second']:.0f}"),
             (f"evaluation pass ({result['eval_images']} images)", f"{result['eval_seconds']:.3f} s"),
             ("inference images/s, batch 1", f"{result['infer_images_per_second_batch1']:.0f}"),
             ("inference images/s, batch 1024", f"{result['infer_images_per_second_batch1024']:.0f}")]
    if "recipe" in result:
        recipe = result["recipe"]
        rows += [("full recipe training time", f"{recipe['train_seconds']:.1f} s"),
                 ("full recipe test accuracy", bench.recipe_accuracy(recipe))]
    width = max(len(label) for label, _ in rows)
    say(f"on {result['hardware']}:")
    for label, value in rows:
        say(f"  {label:<{width}}  {value}")
    if to_stdout:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    elif args.json:
        runs.write_json(Path(args.json), result)
    if args.markdown:
        path = Path(args.markdown)
        text = markdown_text(path)
        if bench.MARKDOWN_HEADER.splitlines()[0] not in text:
            text += ("\n" if text and not text.endswith("\n") else "") + bench.MARKDOWN_HEADER + "\n"
        runs.atomic_write_text(path, text + bench.markdown_row(result) + "\n")
        say(f"appended a row to {path}")
    return 0



def bench_label(config: TrainConfig, preset: str | None) -> str:
    """What `kmnist bench` timed: the preset (or model) and each model argument, the dataset and the batch size
    where they differ from it."""
    from kmnist.models import resolve_model_args

    base = resolve_config(preset=preset) if preset else TrainConfig(model=config.model)
    training = base  # the preset's dataset and batch size, whichever model it ran
    label = preset if preset and base.model == config.model else config.model
    if preset and base.model != config.model:
        label += f" (preset {preset}, model changed)"
        base = TrainConfig(model=config.model)
    reference = resolve_model_args(base.model, base.model_args)
    timed = resolve_model_args(config.model, config.model_args)
    settings = [f"{key}={value}" for key, value in sorted(timed.items()) if reference[key] != value]
    settings += [f"{name}={getattr(config, name)}" for name in ("dataset", "batch_size")  # they change the timing
                 if getattr(config, name) != getattr(training, name)]
    return " ".join([label, *settings])


def markdown_text(path: Path) -> str:
    """What a --markdown file holds so far (nothing where it does not exist yet)."""
    try:
        return path.read_text(encoding="utf-8") if path.exists() else ""
    except UnicodeDecodeError:
        raise KmnistError(f"--markdown {path}: not a UTF-8 text file, so no row can be added to it") from None


def cmd_predict(args: argparse.Namespace) -> int:
    from kmnist.imageprep import Limits
    from kmnist.predict import Classifier, predict_files

    classifier = Classifier.from_file(args.checkpoint)
    limits = Limits(max_bytes=int(args.max_file_mb * 2**20), max_pixels=int(args.max_megapixels * 1e6))
    check_output_folder(args.save_preprocessed, "--save-preprocessed")
    save_dir = Path(args.save_preprocessed) if args.save_preprocessed else None
    if save_dir is not None:
        try:
            save_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise KmnistError(f"cannot create {save_dir}: {error.strerror or error}") from None
    results, failed, count = [], 0, 0
    for count, result in enumerate(predict_files(classifier, args.images, top_k=args.top_k,
                                                  batch_size=args.batch_size, limits=limits,
                                                  recursive=args.recursive), start=1):
        image = result.pop("image", None)
        if "error" in result:
            failed += 1
            print(f"kmnist predict: error: {result['path']}: {result['error']}", file=sys.stderr, flush=True)
        elif save_dir is not None:
            from PIL import Image

            with atomic_writer(save_dir / f"{count:05d}-{Path(result['path']).stem}.png") as out:
                Image.fromarray(image).save(out, format="PNG")
        if args.json:
            results.append(result)
        elif "top" in result:
            ranked = "  ".join(f"{t['character']}[{t['class_index']}] {t['probability'] * 100:5.1f}%"
                               for t in result["top"])
            print(f"{result['path']}  {ranked}", flush=True)
    if args.json:
        print(json.dumps({"checkpoint": str(args.checkpoint), "dataset": classifier.dataset,
                          "model": classifier.model_name, "count": len(results), "failed": failed,
                          "results": results}, indent=2, ensure_ascii=False))
    if failed:
        print(f"kmnist predict: {failed} of {count} file(s) could not be used", file=sys.stderr)
        return 1
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from kmnist.export import export_checkpoint

    check_output_file(args.onnx, "--onnx")
    report = export_checkpoint(args.checkpoint, args.onnx, data_dir_from_args(args), check_md5=not args.skip_md5,
                               tolerance=args.tolerance, batch_size=args.batch_size)
    print(f"wrote {report['path']} ({report['bytes'] / 1024:.0f} KiB, opset {report['opset']}, "
          f"input {report['input']}, outputs {', '.join(report['outputs'])})")
    print(f"validated with onnxruntime {report['onnxruntime_version']} on the {report['split']} split of "
          f"{report['dataset']} ({report['count']} images):")
    print(f"  same predictions as PyTorch  {report['count'] - report['mismatches']}/{report['count']}")
    print(f"  max absolute logit difference {report['max_abs_logit_diff']:.2e} (tolerance {args.tolerance:.0e})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from kmnist.serve import ServeOptions, run_server

    options = ServeOptions(data_dir=data_dir_from_args(args), check_md5=not args.skip_md5, top_k=args.top_k,
                           max_upload_bytes=int(args.max_upload_mb * 2**20),
                           max_pixels=int(args.max_megapixels * 1e6))
    return run_server(args.checkpoint, options, host=args.host, port=args.port, threads=args.threads,
                      access_log=args.access_log, colors=False if os.environ.get("NO_COLOR") else None)



def time_left(spent: Sequence[float], epoch: int, epochs: int) -> float:
    """Seconds the remaining epochs should take at the mean pace of those timed so far."""
    return sum(spent) / len(spent) * (epochs - epoch)


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


def format_trial(event: dict[str, Any]) -> str:
    where = f"[{event['done']}/{event['total']}] {event['point']}"
    if event["state"] == "failed":
        return f"{where}: FAILED: {event['error']}"
    summary = event["summary"] or {}
    text = f"{where}: "
    if summary.get("selected_on") == "val_bal_acc":
        text += (f"val balanced {summary['best_val_bal_acc']:.2f}% (epoch {summary['best_epoch']}), "
                 f"test at that epoch {summary['test_acc_at_best_val']:.2f}% "
                 f"(balanced {summary['test_bal_acc_at_best_val']:.2f}%), ")
    elif summary.get("best_epoch") is not None:
        text += (f"val {summary['best_val_acc']:.2f}% (epoch {summary['best_epoch']}), "
                 f"test at that epoch {summary['test_acc_at_best_val']:.2f}%, ")
    text += f"max test {summary.get('max_test_acc', float('nan')):.2f}% (test-selected), "
    text += f"{summary.get('train_seconds', float('nan')):.0f} s"
    if event.get("resumed"):
        text += ", resumed"
    if event.get("eta_seconds") is not None and event["done"] < event["total"]:
        text += f"; about {format_duration(event['eta_seconds'])} left"
    return text


def cmd_sweep(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from kmnist import sweep
    from kmnist.config import coerce
    from kmnist.sweep_spec import build_spec

    preset, values = config_values_from_args(args)
    spec = build_spec(definition=args.sweep, grid=args.grid, random=args.random, tpe=args.tpe, seeds=args.seeds,
                      trials=args.trials, preset=preset, config=values)
    if args.dry_run:
        if args.out or args.sweep:  # what the real command would find there: another sweep is refused now too
            sweep.check_same_sweep(spec, Path(args.out or Path("sweeps") / spec.name))
        plan = sweep.describe(spec)
        fixed = ", ".join(f"{k}={v}" for k, v in plan["config"].items())
        seeds = f"seed{'' if len(plan['seeds']) == 1 else 's'} {', '.join(map(str, plan['seeds']))}"
        print(f"{plan['method']} sweep over {', '.join(a['name'] for a in plan['axes'])}; {seeds}: "
              f"{plan['runs']} run{'' if plan['runs'] == 1 else 's'}")
        base = f"preset {plan['preset']}" if plan["preset"] else "the defaults (the report's final configuration)"
        print(f"  base: {base}" + (f"; {fixed}" if fixed else ""))
        for name in plan["trial_names"]:
            print(f"  {sweep.TRIALS}/{name}")
        return 0
    if args.out is None and not args.sweep:
        raise KmnistError("--out DIR is needed (the sweep directory; the same --out continues it)")
    out = Path(args.out or Path("sweeps") / spec.name)
    check_output_folder(str(out), "--out")
    placement = sweep.SweepPlacement(
        out=out, data_dir=data_dir_from_args(args), storage=args.storage, study=args.study, jobs=args.jobs,
        threads=coerce("threads", args.threads) if args.threads is not None else 0,
        device=coerce("device", args.device) if args.device is not None else None,
        eval_batch_size=coerce("eval_batch_size", args.eval_batch_size) if args.eval_batch_size is not None else None,
        compile=coerce("compile", args.compile) if args.compile is not None else None,
        oversubscribe=args.oversubscribe, check_md5=not args.skip_md5, heartbeat_seconds=args.heartbeat,
        retry_failed=args.retry_failed)

    def on_start(info: dict[str, Any]) -> None:
        print(f"kmnist {__version__}: sweep {info['out']}: {info['done']}/{info['total']} runs done; "
              f"{info['jobs']} worker(s) x {info['threads']} thread(s); study {info['study']} in {info['storage']}",
              flush=True)

    try:
        result = sweep.run_sweep(spec, placement, progress=show_progress(args),
                                 on_trial=lambda event: tqdm.write(format_trial(event)), on_start=on_start)
    except BaseException as error:
        if interrupted(error):
            print("\ninterrupted; finished trials are saved. Continue with the same command "
                  f"(--out {shlex.quote(str(out))}).", file=sys.stderr)
            return 130
        if not isinstance(error, Exception):
            raise
        failure = sweep.storage_failure(error, placement)  # the study's database refused a read or a write
        if failure is None:
            raise
        raise failure from None
    print(f"\nsweep {result['out']}: {result['complete']}/{result['total']} runs complete "
          f"({format_duration(result['seconds'])} this time)")
    if result["best"] is not None:
        summary = result["best"]["summary"]
        runs_of_best = result["best"]["runs"]
        mean = "" if runs_of_best == 1 else f"mean over {runs_of_best} seeds, "
        text = f"  best by validation: {result['best']['point']}: {mean}val {result['best']['value']:.2f}%"
        if summary.get("test_acc_at_best_val") is not None:
            text += f", test at the chosen epochs {summary['test_acc_at_best_val']:.2f}%"
        if summary.get("selected_on") == "val_bal_acc" and summary.get("test_bal_acc_at_best_val") is not None:
            text += f" (balanced {summary['test_bal_acc_at_best_val']:.2f}%)"
        print(text)
    for failure in result["failed"]:
        print(f"  failed: {failure['point']}: {failure['error']}")
    if result["done"] < result["total"]:
        codes = ", ".join(map(str, result["worker_exit_codes"])) or "?"
        print(f"  {result['total'] - result['done']} run(s) unfinished: workers stopped (exit codes {codes}); "
              "run the same command to continue", file=sys.stderr)
        return 1
    print(f"  tables and figures: kmnist report {result['out']}")
    return 0 if not result["failed"] else 1


def cmd_report(args: argparse.Namespace) -> int:
    from kmnist import runs
    from kmnist.report import write_report

    if args.out is None and len(args.dirs) != 1:
        raise KmnistError("with several directories, say where the report goes: --out DIR")
    check_output_folder(args.out, "--out")
    out = Path(args.out) if args.out else Path(args.dirs[0]) / "report"
    result = write_report(args.dirs, out, vs=args.vs, progress=show_progress(args))
    print(result["markdown"])
    print(f"{result['runs']} finished run(s) in {result['groups']} configuration(s)"
          + (f", {result['incomplete']} unfinished" if result["incomplete"] else "")
          + (f", {len(result['unreadable'])} folder(s) without {runs.CONFIG} left out (named in the notes)"
             if result["unreadable"] else "") + f"; written to {result['out']}:")
    print(f"  {result['html']}   <- open this: the table and every figure in one file")
    for path in result["files"]:
        if path != result["html"]:
            print(f"  {path}")
    unfinished = result["unfinished_curves"]
    print(f"  {result['curves'] + unfinished} learning-curve figure(s) in {Path(result['out']) / 'curves'}"
          + (f" ({unfinished} of unfinished runs, as far as they got)" if unfinished else ""))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from kmnist.config import PRESET_SUMMARIES, PRESETS, TrainConfig, preset_options
    from kmnist.models import create_model, list_models, model_defaults, model_summary, parameter_count

    def parameters(model: str, model_args: dict) -> int:  # at KMNIST's 10 classes
        return parameter_count(create_model(model, num_classes=10, **model_args))

    models = [{"name": name, "summary": model_summary(name), "arguments": model_defaults(name),
               "parameters": parameters(name, {})} for name in list_models()]
    presets = []
    for name in sorted(PRESETS):
        model = PRESETS[name].get("model", TrainConfig().model)
        presets.append({"name": name, "summary": PRESET_SUMMARIES[name], "model": model,
                        "options": preset_options(name),
                        "parameters": parameters(model, PRESETS[name].get("model_args", {}))})
    if args.json:
        print(json.dumps({"models": models, "presets": presets}, indent=2))
        return 0
    print("models (kmnist train --model NAME --model-arg KEY=VALUE; parameters with 10 classes):")
    for model in models:
        arguments = ", ".join(f"{key}={value}" for key, value in model["arguments"].items())
        print(f"  {model['name']}: {model['summary']}; {model['parameters'] / 1e6:.2f} M parameters\n"
              f"      {arguments}")
    print("\npresets (kmnist train --preset NAME; options given beside it override it):")
    for preset in presets:
        options = " ".join(preset["options"]) or "(the defaults)"
        print(f"  {preset['name']}: {preset['summary']}; {preset['model']}, "
              f"{preset['parameters'] / 1e6:.2f} M parameters\n      = {options}")
    return 0


# ---------------------------------------------------------------------------------------------
# parser


def build_parser() -> Parser:
    parser = Parser(prog="kmnist", description="Train, evaluate, compare and serve Kuzushiji-MNIST/K49 classifiers.")
    parser.add_argument("--version", action="version", version=f"kmnist {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    parser.commands = commands.choices  # each command's own parser, by name, as they are added below

    download = commands.add_parser("download", help="fetch and verify a dataset's official files",
                                   description="Fetch (if missing) and verify the official files of a dataset.")
    add_data_options(download)
    download.add_argument("--dataset", choices=DATASETS, default="kmnist", help="(default: kmnist)")
    download.add_argument("--format", choices=("idx", "npz", "all"), default=None,
                          help="file format to fetch and verify (default: the format already present, else idx for "
                               "kmnist and npz for k49)")
    download.add_argument("--no-progress", action="store_true", help="no progress bars")
    download.set_defaults(handler=cmd_download)

    train = commands.add_parser("train", help="train a model; writes a run directory",
                                description="Train a model and write a run directory: config, metrics.csv, "
                                            "summary.json, checkpoints, learning curves, confusion matrix.")
    add_data_options(train)
    train.add_argument("--out", metavar="DIR", help="run directory (default: runs/<dataset>-<model>-<time>)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no progress bars (one line per epoch only)")
    add_config_options(train)
    train.set_defaults(handler=cmd_train)

    evaluate = commands.add_parser("evaluate", help="score checkpoints on the test (or validation) split",
                                   description="Accuracy, balanced accuracy, per-class accuracy and a confusion "
                                               "matrix for one checkpoint, or an ensemble of several.")
    evaluate.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="checkpoint file(s) (.pt)")
    add_data_options(evaluate)
    evaluate.add_argument("--split", choices=("test", "val"), default="test",
                          help="test: the official test split (only its files are read); val: the validation "
                               "split the checkpoint's run held out of the training files (default: test)")
    evaluate.add_argument("--model", help="fail unless every checkpoint holds this model")
    evaluate.add_argument("--device", choices=DEVICES, default="auto", help="(default: auto)")
    evaluate.add_argument("--precision", choices=PRECISIONS, default=None,
                          help="of the forward passes (default: each checkpoint's own, as its run scored it "
                               "while training; auto = bf16 on GPUs and CPUs with bf16 units)")
    evaluate.add_argument("--batch-size", type=int, default=1024, help="images per forward pass (default: 1024)")
    evaluate.add_argument("--out", metavar="DIR", help="folder for metrics.json and the confusion matrix "
                                                       "(default: beside the first checkpoint, one folder per evaluation: "
                                                       "evaluation-<split>-<checkpoint>[-tta<N>], "
                                                       "evaluation-<split>-ensemble<K>-<hash>[-tta<N>])")
    evaluate.add_argument("--tta", type=int, default=1, metavar="N",
                          help="test-time augmentation: average over N shifted views, 1-25: the image, "
                               "its 8 one-pixel shifts, then 16 two-pixel ones (default: 1, off)")
    evaluate.add_argument("--json", action="store_true", help="print the results as JSON")
    evaluate.set_defaults(handler=cmd_evaluate)

    bench = commands.add_parser("bench", help="time training, evaluation and inference; compare pipelines",
                                description="Seconds per training epoch of kmnist's loop and of a per-sample "
                                            "DataLoader pipeline of the same model (interleaved, in one process), "
                                            "evaluation time, and inference throughput at batch 1 and 1024.")
    add_data_options(bench)
    bench.add_argument("--repeats", type=int, default=3, help="runs of each measurement; medians reported (default: 3)")
    bench.add_argument("--max-batches", type=int, default=None, metavar="N",
                       help="time N batches per epoch and scale to a whole epoch (default: whole epochs)")
    bench.add_argument("--no-compare", action="store_true", help="skip the per-sample pipeline")
    bench.add_argument("--baseline-precision", choices=("fp32", "bf16"), default="fp32",
                       help="precision of the per-sample pipeline (default: fp32, as torchvision-style code runs)")
    bench.add_argument("--full", action="store_true", help="also train the whole recipe and report its time and accuracy")
    bench.add_argument("--out", metavar="DIR", help="run directory for --full")
    bench.add_argument("--json", metavar="FILE", nargs="?", const="-",
                       help="write all results, with the hardware, as JSON to FILE; alone (or -): to stdout, "
                            "the table then to stderr")
    bench.add_argument("--markdown", metavar="FILE", help="append a row to this Markdown table (e.g. docs/benchmarks.md)")
    bench.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_config_options(bench)
    bench.set_defaults(handler=cmd_bench)

    predict = commands.add_parser("predict", help="classify image files (PNG, JPEG, ...) or folders of them",
                                  description="Classify images of single characters: each is converted to "
                                              "KMNIST's style (greyscale, light ink on black, cropped to the ink, "
                                              "centred, filling the 28x28 frame) and the top classes printed. "
                                              "A file that cannot be read gets a one-line error; the others "
                                              "are still classified, and the exit status is then 1.")
    predict.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file (.pt)")
    predict.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR",
                         help="image files, and/or folders: their image files (by extension, e.g. .png, .jpg)")
    predict.add_argument("--top-k", type=int, default=3, help="classes shown per image (default: 3)")
    predict.add_argument("--json", action="store_true", help="print all results as one JSON document")
    predict.add_argument("--recursive", action="store_true", help="also take images from subfolders")
    predict.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default: 256)")
    predict.add_argument("--save-preprocessed", metavar="DIR",
                         help="also write the 28x28 image the model saw for each input, as PNG")
    predict.add_argument("--max-file-mb", type=positive_number, default=20,
                         help="refuse larger files, in MiB (default: 20)")
    predict.add_argument("--max-megapixels", type=positive_number, default=50,
                         help="refuse images with more pixels, before decoding them (default: 50)")
    predict.set_defaults(handler=cmd_predict)

    export = commands.add_parser("export", help="export a checkpoint to ONNX and check it against PyTorch",
                                 description="Write an ONNX model (dynamic batch; input: float32 pixels 0-255, "
                                             "(batch, 28, 28), light ink on black; normalisation inside) and "
                                             "check with onnxruntime that it gives the same predictions as "
                                             "PyTorch on the whole test split.")
    export.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file (.pt)")
    export.add_argument("--onnx", required=True, metavar="FILE", help="ONNX file to write")
    add_data_options(export)
    export.add_argument("--tolerance", type=non_negative_number, default=1e-4,
                        help="largest absolute logit difference accepted (default: 1e-4)")
    export.add_argument("--batch-size", type=int, default=1000, help="images per validation batch (default: 1000)")
    export.set_defaults(handler=cmd_export)

    serve = commands.add_parser("serve", help="HTTP service and drawing page for a checkpoint",
                                description="Serve POST /predict (image upload -> top classes as JSON), "
                                            "GET /health, OpenAPI docs at /docs, and at / a page to draw a "
                                            "character and see the model's guesses.")
    serve.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file (.pt)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default: 127.0.0.1, this machine only; the service has no "
                            "authentication)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000; 0 picks a free one)")
    add_data_options(serve)
    serve.add_argument("--top-k", type=int, default=5, help="classes per answer unless a request asks (default: 5)")
    serve.add_argument("--max-upload-mb", type=positive_number, default=5,
                       help="refuse larger request bodies, in MiB (default: 5)")
    serve.add_argument("--max-megapixels", type=positive_number, default=16,
                       help="refuse images with more pixels, before decoding them (default: 16)")
    serve.add_argument("--threads", type=int, default=1,
                       help="torch threads per request (default: 1; requests already run in parallel)")
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.set_defaults(handler=cmd_serve)

    sweep = commands.add_parser(
        "sweep", help="run a grid or random/TPE search over config fields, several seeds per point; resumable",
        description="Run the same training as `kmnist train` over many configurations: a grid (--grid), a "
                    "random or TPE search (--random/--tpe, with --trials), or a bundled definition (--sweep). Each "
                    "run is an ordinary run directory in OUT/trials/. Stopped at any moment, the same command "
                    "continues it: finished runs are kept, a cut-off run resumes from its last epoch.",
        epilog="Axes: NAME=V1,V2,... for a config field (batch_size=64,128), preset=report-row1,report-row2 for "
               "whole presets, model_args.NAME=... for a model argument (model_args.patch=2,4,7,14); for "
               "searches also NAME=LOW..HIGH or NAME=LOW..HIGH:log. Other training options fix a value for every "
               "run. Several machines share one sweep through --storage postgresql://... and the same --study.")
    add_data_options(sweep)
    what = sweep.add_argument_group("what to sweep (give one)")
    what.add_argument("--sweep", metavar="NAME|FILE",
                      help="a bundled sweep (table41, patch-size) or a TOML definition file")
    what.add_argument("--grid", nargs="+", action="extend", metavar="AXIS",
                      help="every combination of the listed values")
    what.add_argument("--random", nargs="+", action="extend", metavar="AXIS", help="random search (with --trials)")
    what.add_argument("--tpe", nargs="+", action="extend", metavar="AXIS", help="Optuna's TPE search (with --trials)")
    what.add_argument("--trials", type=int, metavar="N", help="random/TPE: points to sample")
    what.add_argument("--seeds", type=int, metavar="N",
                      help="runs per point, seeds --seed, --seed+1, ... (default: 1, or the definition's)")
    where = sweep.add_argument_group("where and how it runs")
    where.add_argument("--out", metavar="DIR", help="sweep directory (default for --sweep NAME: sweeps/NAME)")
    where.add_argument("--jobs", type=int, default=1, metavar="N",
                       help="worker processes on this machine, each with --threads threads "
                            "(default: 1; threads default to cores // N)")
    where.add_argument("--oversubscribe", action="store_true",
                       help="allow --jobs x --threads to exceed the CPU cores (slower per run; refused otherwise)")
    where.add_argument("--storage", metavar="URL",
                       help="Optuna RDB storage shared by all workers, e.g. postgresql://user:pw@host/db "
                            "(default: SQLite in the sweep directory)")
    where.add_argument("--study", metavar="NAME",
                       help="study name in the storage (default: the sweep directory's name)")
    where.add_argument("--heartbeat", type=int, default=30, metavar="SECONDS",
                       help="workers record a heartbeat this often; a trial whose heartbeat is 4 intervals old "
                            "is rerun (matters across machines; default: 30)")
    where.add_argument("--retry-failed", action="store_true",
                       help="run again the points whose run raised an error (e.g. diverged) before this command")
    where.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    where.add_argument("--no-progress", action="store_true", help="no progress bar (one line per finished run only)")
    add_config_options(sweep, help_of={"threads": "CPU threads for torch in each worker (default: 0 = cores // "
                                                  "--jobs)"})
    sweep.set_defaults(handler=cmd_sweep)

    report = commands.add_parser(
        "report", help="results table, learning curves and one HTML page from run and sweep directories",
        description="From run and sweep directories: a results table like the report's Table 4.1 (mean ± std over "
                    "seeds; Markdown and CSV), learning curves per run, an overlay of all runs, accuracy against the "
                    "one numeric setting that varies, and report.html holding all of it. Runs still going or cut "
                    "off are left out of the table; their learning curves so far are drawn.")
    report.add_argument("dirs", nargs="+", metavar="DIR", help="run directories, or folders holding them (sweeps)")
    report.add_argument("--out", metavar="DIR", help="where to write (default: DIR/report for one DIR)")
    report.add_argument("--vs", metavar="SETTING",
                        help="setting for the accuracy-versus figure, e.g. model_args.patch "
                             "(default: the only numeric setting that varies)")
    report.add_argument("--no-progress", action="store_true", help="no progress bar while the figures are drawn")
    report.set_defaults(handler=cmd_report)

    models = commands.add_parser("models", help="list registered models and presets",
                                 description="Every registered model with its arguments and their defaults (set "
                                             "them with `kmnist train --model NAME --model-arg KEY=VALUE`) and "
                                             "parameter count, and every preset with the options it stands for.")
    models.add_argument("--json", action="store_true", help="print the lists as JSON")
    models.set_defaults(handler=cmd_models)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """kmnist's own warnings as one line on stderr; any other as Python shows it."""
    if issubclass(category, KmnistWarning):
        print(f"kmnist: warning: {message}", file=sys.stderr)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run_command(argv)
    except BrokenPipeError:  # the reader of the output went away (`kmnist models | head -3`): stop quietly
        # Python flushes stdout once more at exit, which would fail on the closed pipe: point it elsewhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


# Top-level modules of the optional extras in pyproject.toml, and the extra that installs each.
OPTIONAL_PACKAGES = {"optuna": "sweep", "fastapi": "serve", "fastapi_offline": "serve", "uvicorn": "serve",
                     "multipart": "serve", "python_multipart": "serve", "onnx": "export", "onnxruntime": "export",
                     "onnxscript": "export"}


# Commands that take a list of files: files given after an option join the list (`predict CKPT a.png --top-k 2
# b.png`), as argparse alone would refuse them.
FILE_LISTS = {"evaluate": "checkpoints", "predict": "images", "report": "dirs"}


def run_command(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        listed = FILE_LISTS.get(getattr(args, "command", None) or "")
        if listed and extra and not any(word.startswith("-") for word in extra):
            setattr(args, listed, [*getattr(args, listed), *extra])
            extra = []
        if extra:  # reported by the command's own parser: "kmnist train: error: ..."
            parser.commands.get(args.command, parser).error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as stop:  # --help, --version, or a bad option (already reported on one line)
        return stop.code if isinstance(stop.code, int) else 2
    if not getattr(args, "handler", None):  # no command: a usage error, so the help goes to stderr
        parser.print_help(sys.stderr)
        return 2
    from kmnist.cpu import keep_freed_memory

    keep_freed_memory()
    warnings.showwarning = _show_warning
    try:
        return args.handler(args)
    except KmnistError as error:
        print(f"kmnist {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except ModuleNotFoundError as error:  # an optional package this command needs is not installed
        extra = OPTIONAL_PACKAGES.get((error.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"kmnist {args.command}: error: needs {error.name}, which is not installed: "
              f"pip install 'kmnist[{extra}]' (make setup installs everything)", file=sys.stderr)
        return 2
    except OSError as error:
        if error.filename is None:
            if machine_error(error) is None:  # not about a path, nor the machine: a fault worth its traceback
                raise
            print(f"kmnist {args.command}: error: {error.strerror or error}", file=sys.stderr)
            return 1
        # A path that cannot be written or read: --out naming a file, no permission, a full disk, ...
        path = error.filename if error.filename2 is None else f"{error.filename} -> {error.filename2}"
        print(f"kmnist {args.command}: error: {path}: {error.strerror or error}", file=sys.stderr)
        return 1
    except BaseException as error:
        if not interrupted(error):
            raise
        print(f"kmnist {args.command}: interrupted", file=sys.stderr)
        return 130
