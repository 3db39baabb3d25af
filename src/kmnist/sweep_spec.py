"""What a sweep is: its axes, seeds and base configuration, the points they span, and each point's run directory name.

Nothing here runs anything: `kmnist.sweep` takes a `SweepSpec` and runs `fit` over
`dataclasses.replace(config, **point)` for each point.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from kmnist.config import (FIELDS, PLACEMENT_FIELDS, PRESETS, TrainConfig, coerce, option_flag, parse_scalar,
                           read_user_text, resolve_config)
from kmnist.errors import KmnistError
from kmnist.files import folder_safe

METHODS = ("grid", "random", "tpe")
PRESET_AXIS = "preset"  # sweeps over whole named configurations
MODEL_ARG_PREFIX = "model_args."  # model_args.patch=2,4,7,14 sweeps one model argument
SEED = "seed"
RANGE_SEPARATOR = ".."
MAX_NAME_LENGTH = 150  # characters of a trial directory name before it is shortened with a hash


@dataclass(frozen=True)
class Axis:
    """One swept name: a list of values (grid, or categorical in a search) or a numeric range (search only)."""

    name: str
    values: tuple[Any, ...] = ()
    low: int | float | None = None
    high: int | float | None = None
    log: bool = False

    @property
    def is_range(self) -> bool:
        return self.low is not None

    def to_dict(self) -> dict[str, Any]:
        if self.is_range:
            return {"name": self.name, "low": self.low, "high": self.high, "log": self.log}
        return {"name": self.name, "values": list(self.values)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Axis":
        if "values" in data:
            return cls(data["name"], tuple(data["values"]))
        return cls(data["name"], low=data["low"], high=data["high"], log=bool(data.get("log", False)))


@dataclass(frozen=True)
class SweepSpec:
    """Everything that decides what a sweep computes (not where it runs)."""

    method: str
    axes: tuple[Axis, ...]
    seeds: tuple[int, ...]
    preset: str | None = None  # the configuration every point starts from (unless a `preset` axis says otherwise)
    config: dict[str, Any] = field(default_factory=dict)  # fixed config fields over the preset; no placement fields
    trials: int | None = None  # random/tpe: how many points to sample (each run once per seed)
    name: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise KmnistError(f"sweep method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if not self.axes:
            raise KmnistError("a sweep needs at least one axis, e.g. --grid lr=0.01,0.001")
        names = [axis.name for axis in self.axes]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise KmnistError(f"sweep axis given twice: {', '.join(repeated)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise KmnistError(f"a sweep needs one or more distinct seeds, got {list(self.seeds)}")
        if self.method == "grid":
            if self.trials is not None:
                raise KmnistError("--trials is for random/TPE searches; a grid runs every point")
            ranged = [axis.name for axis in self.axes if axis.is_range]
            if ranged:
                raise KmnistError(f"a grid needs lists of values, not ranges ({', '.join(ranged)}); "
                                  "ranges are for --random/--tpe")
        else:
            if self.trials is None:
                raise KmnistError(f"a {self.method} search needs --trials N (points to sample)")
            if not isinstance(self.trials, int) or isinstance(self.trials, bool):
                raise KmnistError(f"--trials must be a whole number, got {self.trials!r}")
            if self.trials < 1:
                raise KmnistError(f"--trials must be at least 1, got {self.trials}")
            size = space_size(self.axes)
            if size is not None and self.trials > size:
                raise KmnistError(f"--trials {self.trials} but the space holds only {size} points; use --grid")
        if self.preset is not None and (not isinstance(self.preset, str) or self.preset not in PRESETS):
            raise KmnistError(f"unknown preset {self.preset!r}; known: {', '.join(sorted(PRESETS))}")
        for axis in self.axes:
            check_not_fixed(axis.name, self.config, self.preset)
            folders: dict[str, Any] = {}
            for value in () if axis.is_range else axis.values:  # each point's run folder is named by its values
                folder = folder_safe(format_value(value))
                if folders.setdefault(folder, value) != value:
                    raise KmnistError(f"sweep axis {axis.name}: {folders[folder]!r} and {value!r} would share the run "
                                      f"folder name {axis.name}={folder}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "method": self.method,
                "axes": [axis.to_dict() for axis in self.axes], "seeds": list(self.seeds), "trials": self.trials,
                "preset": self.preset, "config": dict(self.config)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SweepSpec":
        return cls(method=data["method"], axes=tuple(Axis.from_dict(a) for a in data["axes"]),
                   seeds=tuple(data["seeds"]), preset=data.get("preset"), config=dict(data.get("config") or {}),
                   trials=data.get("trials"), name=data.get("name", ""), description=data.get("description", ""))

    @property
    def swept_names(self) -> list[str]:
        return [axis.name for axis in self.axes]


def space_size(axes: Iterable[Axis]) -> int | None:
    """Number of distinct points when every axis is a list; None when any is a continuous range."""
    size = 1
    for axis in axes:
        if axis.is_range:
            if isinstance(axis.low, float) or isinstance(axis.high, float):
                return None
            size *= int(axis.high) - int(axis.low) + 1
        else:
            size *= len(axis.values)
    return size


# ---------------------------------------------------------------------------------------------
# axes


def check_axis_name(name: str) -> None:
    if name == SEED:
        raise KmnistError("seed is not an axis: use --seeds N (runs seeds --seed, --seed+1, ...)")
    if name in PLACEMENT_FIELDS:
        raise KmnistError(f"{name} says where a trial runs, not what it computes; set it for every worker with "
                          f"{option_flag(name)}")
    if name == "model_args":
        raise KmnistError("sweep one model argument per axis: model_args.NAME=V1,V2 (e.g. model_args.patch=2,4,7,14)")
    if name.startswith(MODEL_ARG_PREFIX):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name[len(MODEL_ARG_PREFIX):]):
            raise KmnistError(f"bad model argument axis {name!r}; write model_args.NAME, e.g. model_args.patch")
        return
    if name != PRESET_AXIS and name not in FIELDS:
        known = ", ".join(n for n in FIELDS if n not in PLACEMENT_FIELDS and n not in ("model_args", SEED))
        raise KmnistError(f"unknown sweep axis {name!r}; use a config field ({known}), preset, or model_args.NAME")


def axis_value(name: str, value: Any) -> Any:
    """One value of an axis, typed like the config field it sets (strings come from the command line)."""
    if name == PRESET_AXIS:
        if value not in PRESETS:
            raise KmnistError(f"unknown preset {value!r} in the preset axis; known: {', '.join(sorted(PRESETS))}")
        return value
    if name.startswith(MODEL_ARG_PREFIX):
        return parse_scalar(value) if isinstance(value, str) else value
    return coerce(name, value)


def choice_axis(name: str, values: Iterable[Any]) -> Axis:
    check_axis_name(name)
    typed = [axis_value(name, value) for value in values]
    if not typed:
        raise KmnistError(f"sweep axis {name} has no values")
    for value in typed:
        if not (value is None or isinstance(value, (bool, int, float, str))):
            raise KmnistError(f"sweep axis {name}: values must be numbers, strings or booleans, got {value!r}")
    repeated = sorted({format_value(v) for v in typed if sum(format_value(w) == format_value(v) for w in typed) > 1})
    if repeated:
        raise KmnistError(f"sweep axis {name} lists {', '.join(repeated)} more than once")
    return Axis(name, tuple(typed))


def range_axis(name: str, low: Any, high: Any, log: bool = False) -> Axis:
    check_axis_name(name)
    if name == PRESET_AXIS:
        raise KmnistError("the preset axis takes a list of preset names, not a range")
    if name.startswith(MODEL_ARG_PREFIX):
        low, high = (parse_scalar(v) if isinstance(v, str) else v for v in (low, high))
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
            raise KmnistError(f"{name}: a range needs numbers, got {low!r}..{high!r}")
        if isinstance(low, float) or isinstance(high, float):
            low, high = float(low), float(high)
    else:
        kind = type(FIELDS[name].default)
        if kind not in (int, float):
            raise KmnistError(f"{name} is not numeric; give it a list of values, not a range")
        low, high = coerce(name, low), coerce(name, high)
    if not low < high:
        raise KmnistError(f"{name}: a range needs low < high, got {low}..{high}")
    if log and low <= 0:
        raise KmnistError(f"{name}: a log range needs a positive low end, got {low}")
    return Axis(name, low=low, high=high, log=log)


def parse_axis(text: str) -> Axis:
    """NAME=V1,V2,... (a list) or NAME=LOW..HIGH[:log] (a range, for searches)."""
    name, sep, values = text.partition("=")
    name = name.strip()
    if not sep or not name or not values.strip():
        raise KmnistError(f"a sweep axis looks like NAME=V1,V2,... or NAME=LOW..HIGH[:log]; got {text!r}")
    if not name.startswith(MODEL_ARG_PREFIX):
        name = name.replace("-", "_")
    if RANGE_SEPARATOR in values:
        bounds, _, scale = values.partition(":")
        if scale not in ("", "log"):
            raise KmnistError(f"{name}: a range ends in :log or nothing, got {values!r}")
        low, _, high = bounds.partition(RANGE_SEPARATOR)
        if not low.strip() or not high.strip():
            raise KmnistError(f"{name}: a range looks like LOW..HIGH, got {values!r}")
        return range_axis(name, low.strip(), high.strip(), log=scale == "log")
    items = [item.strip() for item in values.split(",")]
    if any(not item for item in items):
        raise KmnistError(f"{name}: empty value in {values!r}")
    return choice_axis(name, items)


def flatten_table(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """TOML `[grid.model_args] patch = [...]` and `"model_args.patch" = [...]` name the same axis."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and not ({"low", "high"} & set(value)):
            flat.update(flatten_table(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def axis_from_file(name: str, value: Any, source: str) -> Axis:
    if isinstance(value, list):
        return choice_axis(name, value)
    if isinstance(value, dict):
        unknown = set(value) - {"low", "high", "log"}
        if unknown or not {"low", "high"} <= set(value):
            raise KmnistError(f"{source}: {name} must be a list of values or {{ low = ..., high = ..., log = ... }}")
        return range_axis(name, value["low"], value["high"], bool(value.get("log", False)))
    raise KmnistError(f"{source}: {name} must be a list of values, got {value!r}")


def check_not_fixed(name: str, config: dict[str, Any], preset: str | None) -> None:
    if name == PRESET_AXIS and preset is not None:
        raise KmnistError(f"preset is both fixed (preset {preset}, by --preset or a config file) and swept; drop one")
    if name.startswith(MODEL_ARG_PREFIX) and name[len(MODEL_ARG_PREFIX):] in (config.get("model_args") or {}):
        raise KmnistError(f"{name} is both fixed (--model-arg or a config file) and swept; drop one")
    if name in config:
        raise KmnistError(f"{name} is both fixed ({name} = {config[name]!r}) and swept; drop one")


# ---------------------------------------------------------------------------------------------
# sweep definition files (src/kmnist/sweeps/*.toml) and building a spec


def bundled_definitions() -> list[str]:
    folder = resources.files("kmnist").joinpath("sweeps")
    return sorted(entry.name[:-5] for entry in folder.iterdir() if entry.name.endswith(".toml"))


def load_definition(name_or_path: str) -> tuple[str, dict[str, Any]]:
    """A sweep definition by bundled name (`table41`) or path to a TOML file; returns (name, table)."""
    path = Path(name_or_path)
    if path.suffix == ".toml" and path.is_file():
        text, name = read_user_text(path, "sweep definition"), path.stem
    else:
        entry = resources.files("kmnist").joinpath("sweeps", f"{name_or_path}.toml")
        if path.suffix == ".toml" and not entry.is_file():
            raise KmnistError(f"sweep definition not found: {path}" + (" (a folder)" if path.is_dir() else ""))
        if not entry.is_file():
            raise KmnistError(f"unknown sweep {name_or_path!r}: not a .toml file, and the bundled sweeps are "
                              f"{', '.join(bundled_definitions())}")
        text, name = entry.read_text(encoding="utf-8"), name_or_path
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise KmnistError(f"cannot parse sweep definition {name_or_path}: {error}") from None
    unknown = set(data) - {"description", "method", "preset", "seeds", "trials", "config", "grid", "space"}
    if unknown:
        raise KmnistError(f"sweep definition {name_or_path}: unknown keys {', '.join(sorted(unknown))}")
    return name, data


def build_spec(*, definition: str | None = None, grid: list[str] | None = None, random: list[str] | None = None,
               tpe: list[str] | None = None, seeds: int | None = None, trials: int | None = None,
               preset: str | None = None, config: dict[str, Any] | None = None, name: str = "") -> SweepSpec:
    """A spec from a definition file and/or axes from the command line; command-line values win.

    `config` holds the fixed config fields (config file, then options); placement fields are dropped,
    since they say where a trial runs. The first seed is config['seed'] (default 0).
    """
    given = [flag for flag, value in (("--sweep", definition), ("--grid", grid), ("--random", random),
                                      ("--tpe", tpe)) if value]
    if len(given) != 1:
        raise KmnistError("give exactly one of --sweep NAME, --grid AXIS..., --random AXIS... or --tpe AXIS..."
                          + (f" (got {', '.join(given)})" if given else ""))
    values: dict[str, Any] = {}
    description = ""
    if definition:
        name, data = load_definition(definition)
        source = f"sweep {name}"
        method = data.get("method", "grid")
        if method not in METHODS:
            raise KmnistError(f"{source}: method must be one of {', '.join(METHODS)}")
        table = data.get("grid" if method == "grid" else "space")
        if not isinstance(table, dict) or not table:
            raise KmnistError(f"{source}: needs a [{'grid' if method == 'grid' else 'space'}] table of axes")
        axes = tuple(axis_from_file(key, value, source) for key, value in flatten_table(table).items())
        file_seeds = data.get("seeds", 1)
        seeds = seeds if seeds is not None else file_seeds
        trials = trials if trials is not None else data.get("trials")
        preset = preset or data.get("preset")
        if not isinstance(data.get("config") or {}, dict):
            raise KmnistError(f"{source}: config must be a table of field = value, got {data['config']!r}")
        values.update(data.get("config") or {})
        description = data.get("description", "")
    else:
        method = "grid" if grid else "random" if random else "tpe"
        axes = tuple(parse_axis(text) for text in (grid or random or tpe or []))
    seeds = 1 if seeds is None else seeds
    config = dict(config or {})
    if "model_args" in values and "model_args" in config:
        config["model_args"] = {**values["model_args"], **config["model_args"]}
    values.update(config)
    values = {key: value for key, value in values.items() if key not in PLACEMENT_FIELDS}
    first_seed = coerce(SEED, values.pop(SEED, 0))
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise KmnistError(f"--seeds must be a count of at least 1, got {seeds!r}")
    values = {key: value if key == "model_args" else coerce(key, value) for key, value in values.items()}
    return SweepSpec(method=method, axes=axes, seeds=tuple(range(first_seed, first_seed + seeds)), preset=preset,
                     config=values, trials=trials, name=name, description=description)


# ---------------------------------------------------------------------------------------------
# points, names, configurations


def search_space(spec: SweepSpec) -> dict[str, list[Any]]:
    """The grid as Optuna's GridSampler takes it: every axis, and the seed."""
    return {**{axis.name: list(axis.values) for axis in spec.axes}, SEED: list(spec.seeds)}


def grid_points(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every point of a grid sweep (seed innermost), in the order the axes were given."""
    combos = itertools.product(*(axis.values for axis in spec.axes), spec.seeds)
    return [dict(zip([*spec.swept_names, SEED], combo)) for combo in combos]


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return format(value, ".6g")
    return str(value)


def trial_name(spec: SweepSpec, point: dict[str, Any]) -> str:
    """The run directory name of a point: readable and fixed by the point, e.g. `batch_size=64,lr=0.01,seed=0`."""
    parts = [f"{name}={format_value(point[name])}" for name in [*spec.swept_names, SEED]]
    name = folder_safe(",".join(parts))
    if len(name) > MAX_NAME_LENGTH:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name[:MAX_NAME_LENGTH - 11]}~{digest}"
    return name


def point_config(spec: SweepSpec, point: dict[str, Any], placement: dict[str, Any] | None = None) -> TrainConfig:
    """The point's configuration: the preset, the fixed fields, then `dataclasses.replace(config, **point)`."""
    fields = {name: value for name, value in point.items() if name in FIELDS}
    model_args = {name[len(MODEL_ARG_PREFIX):]: value for name, value in point.items()
                  if name.startswith(MODEL_ARG_PREFIX)}
    # The point is the last layer, as the command line is for `kmnist train`.
    config = resolve_config(preset=point.get(PRESET_AXIS, spec.preset), file_values=spec.config,
                            overrides={**fields, "model_args": model_args})
    return dataclasses.replace(config, **(placement or {}))


def check_points(spec: SweepSpec, points: Iterable[dict[str, Any]]) -> None:
    """Fail before any work if a point's configuration or model is impossible."""
    from kmnist.models import create_model

    checked: set[str] = set()
    for point in points:
        try:
            config = point_config(spec, point)
            key = repr((config.model, sorted(config.model_args.items())))
            if key not in checked:
                create_model(config.model, **config.model_args)
                checked.add(key)
        except KmnistError as error:
            where = ", ".join(f"{k}={format_value(v)}" for k, v in point.items() if k != SEED)
            raise KmnistError(f"sweep point {where}: {error}") from None


def corner_points(spec: SweepSpec) -> list[dict[str, Any]]:
    """For a search: each listed value and each range end, so `check_points` sees every extreme."""
    base = {axis.name: (axis.values[0] if not axis.is_range else axis.low) for axis in spec.axes}
    points = []
    for axis in spec.axes:
        for value in (axis.values if not axis.is_range else (axis.low, axis.high)):
            points.append({**base, axis.name: value, SEED: spec.seeds[0]})
    return points


def planned_points(spec: SweepSpec) -> int:
    """How many runs the sweep makes in all."""
    if spec.method == "grid":
        return len(grid_points(spec))
    return int(spec.trials or 0) * len(spec.seeds)
