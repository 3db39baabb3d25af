"""Results of many runs, read from their saved files: grouped by configuration (seed aside), mean ± std over seeds."""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from kmnist import runs
from kmnist.config import PLACEMENT_FIELDS, PRESETS, TrainConfig, complete_model_args, resolve_config
from kmnist.errors import KmnistError

IGNORED_FIELDS = ("seed", *PLACEMENT_FIELDS)  # runs that differ only in these are repeats of one configuration
TABLE_FIELDS = ("batch_size", "lr", "epochs")  # the configuration columns of the report's Table 4.1
METRICS = ("final_train_acc", "test_acc_at_best_val", "max_test_acc", "best_val_acc", "train_seconds",
           "test_bal_acc_at_best_val", "best_val_bal_acc", "final_test_acc", "final_test_bal_acc")
CURVE_METRICS = ("train_acc", "val_acc", "test_acc", "train_loss", "val_loss", "test_loss")
# The report's Table 4.1 and final model: maximum test accuracy over epochs (%), chosen on the test set.
REPORTED_MAX_TEST_ACC = {"report-row1": 89.32, "report-row2": 91.23, "report-row3": 92.78, "report-final": 93.13}


@dataclass
class Run:
    run_dir: Path
    name: str
    config: dict[str, Any]
    summary: dict[str, Any] | None  # None until the run has finished
    environment: dict[str, Any] | None

    @property
    def complete(self) -> bool:
        return self.summary is not None


@dataclass
class Group:
    """Runs of one configuration (differing only in seed and placement)."""

    settings: dict[str, Any]  # the flattened configuration, seed and placement aside
    runs: list[Run]
    label: str = ""
    preset: str | None = None  # the preset whose configuration this is, if any
    base: str | None = None  # the preset nearest to it: the fewest settings differ
    changes: dict[str, Any] = field(default_factory=dict)  # the settings that differ from the base preset's
    stats: dict[str, tuple[float, float | None]] = field(default_factory=dict)  # metric -> (mean, std)

    @property
    def seeds(self) -> list[int]:
        return sorted(run.config.get("seed", 0) for run in self.runs)

    @property
    def repeated_seeds(self) -> list[int]:
        """Seeds with more than one run in the group: repeats of one computation, not independent seeds."""
        seeds = self.seeds
        return sorted({seed for seed in seeds if seeds.count(seed) > 1})

    @property
    def reported_max_test_acc(self) -> float | None:
        return REPORTED_MAX_TEST_ACC.get(self.preset) if self.preset else None


@dataclass
class Results:
    groups: list[Group]
    incomplete: list[Run]  # run directories without summary.json (cut off, still running, or failed)
    progress: dict[str, list[dict[str, Any]]]  # unfinished run name -> its epochs so far, for those with any
    varying: list[str]  # settings that differ between groups
    columns: list[str]  # of those, the ones shown as columns of the table (the rest are in the labels)
    hardware: list[str]
    unreadable: list[Path] = field(default_factory=list)  # folders with run files but no config.json


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories named directly, or found (by their config.json) anywhere below the given folders."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.exists() and not path.is_dir():
            raise KmnistError(f"{path} is a file; name run or sweep folders")
        if not path.is_dir():
            raise KmnistError(f"no such directory: {path}")
        if (path / runs.CONFIG).is_file():
            found.append(path)
            continue
        below = sorted(config.parent for config in path.rglob(runs.CONFIG))
        if not below and not folders_without_config([path]):  # (run files without config.json: named as left out)
            raise KmnistError(f"{path} holds no run directories (no {runs.CONFIG} below it)")
        found.extend(below)
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def folders_without_config(paths: Iterable[str | Path]) -> list[Path]:
    """Folders below `paths` holding a run's files (summary.json or metrics.csv) but no config.json: not runs
    this version can group, left out of a report, and named there so they are not missed."""
    found = set()
    for path in map(Path, paths):
        for name in (runs.SUMMARY, runs.METRICS):
            found.update(file.parent for file in path.rglob(name) if not (file.parent / runs.CONFIG).is_file())
    return sorted(found)


def _read_record(path: Path, optional: bool = False) -> dict[str, Any] | None:
    """A run's JSON file (config, summary, environment), which holds one object; None if optional and absent."""
    if optional and not path.is_file():
        return None
    return runs.read_record(path)


def read_runs(paths: Iterable[str | Path]) -> list[Run]:
    dirs = find_run_dirs(paths)
    names = [d.name for d in dirs]
    if len(set(names)) < len(names):  # two sweeps hold runs of the same name: name them by their path
        common = Path(os.path.commonpath([d.resolve() for d in dirs]))
        names = [str(d.resolve().relative_to(common)) for d in dirs]
    result = []
    for run_dir, name in zip(dirs, names):
        config = _read_record(run_dir / runs.CONFIG)
        missing = [key for key in ("model", "dataset") if not isinstance(config.get(key), str)]
        if missing:  # e.g. a config.json of some other tool below the folder named
            raise KmnistError(f"{run_dir / runs.CONFIG}: not a kmnist run configuration (no {' or '.join(missing)})")
        summary = _read_record(run_dir / runs.SUMMARY, optional=True)
        for metric in METRICS if summary is not None else ():
            value = summary.get(metric)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise KmnistError(f"{run_dir / runs.SUMMARY}: {metric} is not a number ({value!r:.40})")
        result.append(Run(run_dir, name, config, summary, _read_record(run_dir / runs.ENVIRONMENT, optional=True)))
    return result


def settings_of(config: dict[str, Any]) -> dict[str, Any]:
    """A config flattened (model_args.NAME), model arguments completed with the model's defaults, seed aside.

    So `{}` and `{"patch": 4}` are the same setting when 4 is the model's default, and a run saved before a
    field existed has that field's default, as for `config.same_experiment`.
    """
    config = {**TrainConfig().to_dict(), **config}  # a field saved before it existed counts as its default
    model_args = complete_model_args(config["model"], dict(config.get("model_args") or {}))
    flat = {name: value for name, value in config.items() if name not in IGNORED_FIELDS and name != "model_args"}
    flat.update({f"model_args.{name}": value for name, value in sorted(model_args.items())})
    return flat


def preset_settings() -> dict[str, dict[str, Any]]:
    return {name: settings_of(resolve_config(preset=name).to_dict()) for name in PRESETS}


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); no std for a single value."""
    values = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return float("nan"), None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _sortable(value: Any) -> tuple[int, Any]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value)
    return (1, str(value))


def format_setting(value: Any) -> str:
    if isinstance(value, float):
        return format(value, ".6g")
    return str(value)


# Up to this many settings varying between configurations, each is a column and the labels name them all (a sweep:
# "batch_size=64 lr=0.01"); past it, a folder of unrelated runs (docs/results/runs: 47), each is labelled by its
# nearest preset and what differs from it ("cnn-fast-cpu, epochs=30 val_size=0"), and only the model gets a column.
MAX_SETTING_COLUMNS = 8


def setting_columns(varying: list[str]) -> list[str]:
    """The varying settings that get a column of their own."""
    return varying if len(varying) <= MAX_SETTING_COLUMNS else [name for name in varying if name == "model"]


def changes_from(settings: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """The settings that differ from a preset's, in config order. Under another model, its own arguments count
    against that model's defaults (not the preset model's, which it does not have)."""
    own_defaults = settings_of({"model": settings["model"]}) if settings["model"] != base.get("model") else base
    changed = {}
    for name, value in settings.items():
        reference = own_defaults.get(name) if name.startswith("model_args.") else base.get(name)
        if repr(value) != repr(reference):
            changed[name] = value
    return changed


def nearest_preset(settings: dict[str, Any], presets: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """(the preset from which the fewest settings differ, those settings); ties go to the first preset."""
    candidates = [(name, changes_from(settings, preset)) for name, preset in presets.items()]
    return min(candidates, key=lambda candidate: len(candidate[1]))


def changes_label(group: Group) -> str:
    """`cnn-fast-cpu` or `cnn-fast-cpu, epochs=30 val_size=0`."""
    changed = " ".join(f"{name}={format_setting(value)}" for name, value in group.changes.items())
    return f"{group.base}, {changed}" if changed else str(group.base)


def group_runs(all_runs: list[Run]) -> tuple[list[Group], list[str]]:
    """Complete runs grouped by configuration; also the settings that vary between groups."""
    groups: dict[str, Group] = {}
    for run in all_runs:
        if not run.complete:
            continue
        settings = settings_of(run.config)
        key = repr(sorted(settings.items(), key=lambda item: item[0]))
        groups.setdefault(key, Group(settings, [])).runs.append(run)
    ordered = list(groups.values())
    names = sorted({name for group in ordered for name in group.settings})
    varying = [name for name in names if len({repr(group.settings.get(name)) for group in ordered}) > 1]
    presets = preset_settings()
    for group in ordered:
        group.runs.sort(key=lambda run: (run.config.get("seed", 0), run.name))
        group.preset = next((name for name, settings in presets.items() if settings == group.settings), None)
        group.base, group.changes = nearest_preset(group.settings, presets)
        group.stats = {metric: mean_std([run.summary.get(metric) for run in group.runs]) for metric in METRICS}
    by_preset = all(group.preset for group in ordered) and len(ordered) > 1
    by_changes = not by_preset and setting_columns(varying) != varying
    for group in ordered:
        if by_preset:
            group.label = group.preset
        elif by_changes:
            group.label = changes_label(group)
        elif varying:
            group.label = " ".join(f"{name}={format_setting(group.settings.get(name))}" for name in varying)
        else:
            group.label = group.preset or (group.runs[0].name if len(group.runs) == 1 else group.settings["model"])
    preset_rank = {name: rank for rank, name in enumerate(REPORTED_MAX_TEST_ACC)}
    all_ranks = {name: rank for rank, name in enumerate(PRESETS)}
    if by_changes:  # each preset with its variations, in the presets' order
        ordered.sort(key=lambda group: (all_ranks[group.base], len(group.changes),
                                        [_sortable(group.settings.get(name)) for name in varying]))
    else:
        ordered.sort(key=lambda group: (preset_rank.get(group.preset, len(preset_rank)) if by_preset else 0,
                                        [_sortable(group.settings.get(name)) for name in varying]))
    return ordered, varying


def collect(paths: Iterable[str | Path]) -> Results:
    """Every run below `paths`, grouped, with the hardware they ran on."""
    from kmnist.runinfo import hardware_summary

    paths = list(paths)  # read twice: the runs, then the folders left out
    all_runs = read_runs(paths)
    groups, varying = group_runs(all_runs)
    hardware = sorted({hardware_summary(env) for run in all_runs if run.complete and run.environment
                       for env in sessions(run.environment)})
    incomplete = [run for run in all_runs if not run.complete]
    return Results(groups, incomplete, progress=unfinished_histories(incomplete), varying=varying,
                   columns=setting_columns(varying), hardware=hardware, unreadable=folders_without_config(paths))


def unfinished_histories(incomplete: list[Run]) -> dict[str, list[dict[str, Any]]]:
    """The epochs so far of each unfinished run that has any (a run still going rewrites its metrics.csv
    atomically, so it can be read at any moment); one whose table is missing or unreadable has none."""
    histories = {}
    for run in incomplete:
        try:
            history = runs.read_metrics(run.run_dir)
        except (OSError, KmnistError):
            continue
        if history:
            histories[run.name] = history
    return histories


def sessions(environment: dict[str, Any]) -> list[dict[str, Any]]:
    """Every session's environment of a run: where it started, then each --resume (entries not objects skipped)."""
    resumed = environment.get("resumed")
    return [environment, *(env for env in (resumed if isinstance(resumed, list) else []) if isinstance(env, dict))]


def group_curves(group: Group) -> dict[str, Any]:
    """Per-epoch mean and std over the group's runs, over the epochs every run has."""
    histories = [runs.read_metrics(run.run_dir) for run in group.runs]
    epochs = sorted(set.intersection(*(set(row["epoch"] for row in history) for history in histories)))
    curves: dict[str, Any] = {"label": group.label, "epoch": epochs}
    for metric in CURVE_METRICS:
        by_epoch = [{row["epoch"]: row[metric] for row in history} for history in histories]
        stats = [mean_std([values[epoch] for values in by_epoch]) for epoch in epochs]
        curves[metric] = ([mean for mean, _ in stats], [std or 0.0 for _, std in stats])
    return curves


def numeric(values: Iterable[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def versus_field(results: Results, requested: str | None = None) -> str | None:
    """The setting for an accuracy-versus figure: the one requested, or the only numeric setting that varies."""
    if requested is not None:
        if requested not in results.varying:
            raise KmnistError(f"--vs {requested}: not a setting that varies between these runs "
                              f"(varying: {', '.join(results.varying) or 'none'})")
        if not numeric(group.settings.get(requested) for group in results.groups):
            raise KmnistError(f"--vs {requested}: its values are not numbers")
        return requested
    if len(results.varying) == 1 and numeric(group.settings.get(results.varying[0]) for group in results.groups):
        return results.varying[0]
    return None
