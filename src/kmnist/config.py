"""The one training configuration: a frozen dataclass, its named presets, and loading from TOML/YAML."""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kmnist.errors import KmnistError

DATASETS = ("kmnist", "k49")
IMAGE_SIZE = 28  # pixels per side in both datasets
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("plateau", "cosine", "onecycle", "none")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
# torch.compile of the model for training: off, or one of its modes (reduce-overhead adds CUDA graphs on a GPU);
# cuda-graph: no torch.compile, the whole training step captured as one CUDA graph (kmnist.graphed);
# cuda-graph-compiled: the same graph around the model compiled by torch.compile (its default mode), so that the
# graph replays inductor's fused kernels instead of one kernel per op.
GRAPH_MODES = ("cuda-graph", "cuda-graph-compiled")
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", *GRAPH_MODES)
# The --compile modes that compile the model, and the torch.compile mode each asks for (None: its default).
TORCH_COMPILE_MODES = {"default": None, "reduce-overhead": "reduce-overhead", "max-autotune": "max-autotune",
                       "cuda-graph-compiled": None}


def _field(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides what a training run computes. Defaults are the report's final configuration."""

    dataset: str = _field("kmnist", "dataset: kmnist or k49")
    val_size: int = _field(5000, "training images held out (stratified by class) to choose epoch and model; 0 for none")
    model: str = _field("report-mixer", "registered model name (see `kmnist models`)")
    model_args: dict[str, Any] = field(default_factory=dict, metadata={"help": "overrides of the model's own defaults"})
    epochs: int = _field(20, "passes over the training split (report: 20)")
    batch_size: int = _field(128, "images per optimiser step (report: 128)")
    optimizer: str = _field("adam", "adam, adamw or sgd (Nesterov) (report: adam)")
    lr: float = _field(1e-3, "learning rate; the peak for cosine/onecycle (report: 1e-3)")
    weight_decay: float = _field(5e-4, "adam/sgd: L2 added to the gradient; adamw: decoupled (report: 5e-4)")
    momentum: float = _field(0.9, "SGD momentum")
    scheduler: str = _field("plateau", "plateau (on validation accuracy; on training accuracy with --val-size 0), "
                                       "cosine, onecycle or none (report: plateau)")
    plateau_patience: int = _field(15, "epochs without validation improvement before the lr drops (report: 15)")
    plateau_factor: float = _field(0.1, "lr multiplier at each plateau drop")
    warmup_epochs: float = _field(0.0, "linear warm-up for cosine/onecycle, in epochs")
    label_smoothing: float = _field(0.0, "cross-entropy label smoothing, 0 to <1")
    class_weighting: bool = _field(False, "weight the loss by inverse class frequency (imbalanced K49)")
    translate: float = _field(0.0, "augmentation: max random shift, pixels")
    rotate: float = _field(0.0, "augmentation: max random rotation, degrees")
    scale: float = _field(0.0, "augmentation: max relative change of size (0.1 = 90-110 percent)")
    shear: float = _field(0.0, "augmentation: max random shear, degrees")
    elastic: float = _field(0.0, "augmentation: elastic distortion strength, pixels")
    erase: float = _field(0.0, "augmentation: probability of erasing a random rectangle (cutout)")
    mixup: float = _field(0.0, "mixup Beta(alpha, alpha) parameter; 0 = off")
    cutmix: float = _field(0.0, "cutmix Beta(alpha, alpha) parameter; 0 = off (with mixup: one or the other per batch)")
    clean_epochs: int = _field(0, "the last N epochs train on the images as they are: no augmentation, erasing, "
                                  "mixup or cutmix (0 = augment every epoch)")
    ema: float = _field(0.0, "decay of an exponential moving average of the weights and BatchNorm statistics, "
                             "used for evaluation; 0 = off")
    teacher: str = _field("", "checkpoint of a trained model whose predictions the model also learns from "
                             "(knowledge distillation); empty = off")
    distill_weight: float = _field(0.5, "with --teacher: weight of the teacher's term in the loss (the labels' "
                                        "term gets 1 minus it)")
    distill_temperature: float = _field(0.0, "with --teacher: 0 = learn the teacher's top class as a label (with "
                                             "the run's label smoothing); above 0 = its softened probabilities "
                                             "at this temperature")
    balanced_sampling: bool = _field(False, "draw training batches with equal probability per class (imbalanced K49)")
    seed: int = _field(0, "seed for initialisation, batch order and the validation split")
    device: str = _field("auto", "auto (CUDA when present, else CPU), cpu or cuda")
    precision: str = _field("auto", "auto (bf16 autocast on CUDA and on CPUs with AMX/AVX512-BF16, else fp32), "
                                    "fp32 or bf16")
    compile: str = _field("off", "torch.compile the model for training: off, default, reduce-overhead (CUDA graphs "
                                 "on a GPU) or max-autotune; or cuda-graph: the whole step, optimiser included, "
                                 "captured as one CUDA graph (GPU only; no mixup/cutmix), or cuda-graph-compiled: "
                                 "that graph around the model compiled in torch.compile's default mode; compiling "
                                 "happens before the clock starts")
    threads: int = _field(0, "CPU threads for torch; 0 keeps torch's default (one per core)")
    eval_batch_size: int = _field(1024, "images per forward pass when evaluating")

    def __post_init__(self) -> None:
        _check_choice("dataset", self.dataset, DATASETS)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("scheduler", self.scheduler, SCHEDULERS)
        _check_choice("device", self.device, DEVICES)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("compile", self.compile, COMPILE_MODES)
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise KmnistError(f"{name} must be at least 1, got {getattr(self, name)}")
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise KmnistError(f"{item.name} must be a finite number, got {value}")
        if not self.lr > 0:
            raise KmnistError(f"lr must be positive, got {self.lr}")
        if not -SEED_LIMIT < self.seed < SEED_LIMIT:
            raise KmnistError(f"seed must be between {-SEED_LIMIT + 1} and {SEED_LIMIT - 1}, got {self.seed}")
        for name in ("val_size", "weight_decay", "warmup_epochs", "threads", "plateau_patience", "translate",
                     "rotate", "scale", "shear", "elastic", "mixup", "cutmix"):
            if getattr(self, name) < 0:
                raise KmnistError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.threads > MAX_THREADS:
            raise KmnistError(f"threads must be at most {MAX_THREADS}, got {self.threads}")
        if not 0 < self.momentum < 1:
            raise KmnistError(f"momentum must be in (0, 1), got {self.momentum}")
        # A factor of 1 +- scale at or past 0 would shrink a character to nothing or turn it over (a flip);
        # a shear of 90 degrees or more would do the same through its tangent.
        if self.scale >= 1:
            raise KmnistError(f"scale must be below 1 (factors 1 - scale to 1 + scale), got {self.scale}")
        if self.shear >= 90:
            raise KmnistError(f"shear must be below 90 degrees, got {self.shear}")
        # A shift or a distortion of a whole image side (28 pixels in both datasets) leaves a blank image; a turn
        # past 180 degrees is a smaller one the other way.
        for name in ("translate", "elastic"):
            if getattr(self, name) >= IMAGE_SIZE:
                raise KmnistError(f"{name} must be below {IMAGE_SIZE} pixels (the image's side), "
                                  f"got {getattr(self, name)}")
        if self.rotate > 180:
            raise KmnistError(f"rotate must be at most 180 degrees, got {self.rotate}")
        if not 0 <= self.label_smoothing < 1:
            raise KmnistError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 <= self.distill_weight <= 1:
            raise KmnistError(f"distill_weight must be in [0, 1], got {self.distill_weight}")
        if self.distill_temperature < 0:
            raise KmnistError(f"distill_temperature must not be negative, got {self.distill_temperature}")
        if not 0 <= self.erase <= 1:
            raise KmnistError(f"erase must be in [0, 1], got {self.erase}")
        if not 0 <= self.ema < 1:
            raise KmnistError(f"ema must be in [0, 1), got {self.ema}")
        if not 0 < self.plateau_factor < 1:
            raise KmnistError(f"plateau_factor must be in (0, 1), got {self.plateau_factor}")
        if self.compile in GRAPH_MODES and (self.mixup or self.cutmix):
            raise KmnistError(f"--compile {self.compile} cannot mix batches (mixup/cutmix): their mixing weight changes "
                              "on the host at every step")
        if not 0 <= self.clean_epochs <= self.epochs:
            raise KmnistError(f"clean_epochs must be between 0 and epochs ({self.epochs}), got {self.clean_epochs}")
        if not isinstance(self.model_args, dict):
            raise KmnistError("model_args must be a table of name = value")
        # A copy of its own: a change to the caller's dict afterwards does not change this config.
        object.__setattr__(self, "model_args", dict(self.model_args))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


MAX_THREADS = 4096  # torch takes a C int; far more than any machine's cores

# Random streams are seeded with train.stream_seed, (seed * 1_000_003 + epoch) * 8 + stream: torch takes 64 bits.
SEED_LIMIT = 10**12


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise KmnistError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


# The all-MLP presets' training: AdamW, cosine schedule with warm-up, label smoothing, batched augmentation.
MIXER_RECIPE: dict[str, Any] = {"epochs": 36, "batch_size": 256, "optimizer": "adamw", "lr": 2e-3, "weight_decay": 0.05,
                                "scheduler": "cosine", "warmup_epochs": 2.0, "label_smoothing": 0.1, "translate": 2.0,
                                "rotate": 10.0, "scale": 0.1, "shear": 10.0, "erase": 0.25}

# The report's configurations (Table 4.1 rows and its final model). Values not named keep the
# defaults above, which are the report's final configuration.
PRESETS: dict[str, dict[str, Any]] = {
    "report-final": {},
    "report-row1": {"batch_size": 64, "lr": 0.01, "epochs": 20},
    "report-row2": {"batch_size": 128, "lr": 0.01, "epochs": 30},
    "report-row3": {"batch_size": 256, "lr": 0.001, "epochs": 30},
    # A small CNN that beats the report's best test accuracy in under half a minute on 2 CPU cores, also
    # on CPUs without bf16 units (docs/benchmarks.md): one epoch, one-cycle SGD, label smoothing.
    "quick-cnn": {"model": "resnet-small", "model_args": {"width": 8, "depth": 1}, "epochs": 1,
                  "batch_size": 256, "optimizer": "sgd", "lr": 0.2, "weight_decay": 5e-4,
                  "scheduler": "onecycle", "label_smoothing": 0.1},
    # The best CNN within about 15 minutes of training on 2 CPU cores (docs/results.md): a ResNet-9-style
    # network, one-cycle SGD, label smoothing and batched geometric augmentation with cutout.
    "cnn-fast-cpu": {"model": "resnet-small", "model_args": {"width": 32, "depth": 1}, "epochs": 20,
                     "batch_size": 256, "optimizer": "sgd", "lr": 0.2, "weight_decay": 5e-4,
                     "scheduler": "onecycle", "label_smoothing": 0.1, "translate": 2.0, "rotate": 10.0,
                     "scale": 0.1, "shear": 10.0, "erase": 0.5},
    # GPU-sized: a pre-activation ResNet-18 with the same recipe, longer, and a weight average.
    "cnn-best": {"model": "preact-resnet18", "epochs": 60, "batch_size": 256, "optimizer": "sgd", "lr": 0.1,
                 "weight_decay": 5e-4, "scheduler": "onecycle", "label_smoothing": 0.1, "translate": 2.0,
                 "rotate": 10.0, "scale": 0.1, "shear": 10.0, "erase": 0.5, "ema": 0.999},
    # No convolution anywhere: the all-MLP Mixer in two stages (14x14 tokens from 4x4 patches every 2 pixels,
    # then each 2x2 of them merged: 7x7; pre-norm, GELU, stochastic depth) with AdamW, cosine schedule with
    # warm-up, and the same batched augmentation. Better on validation than `mixer-flat` for each of 3 seeds
    # (docs/results.md); 51-58 minutes on 2 cores of an AVX512-BF16 EPYC. Until 2026-12-01 `mixer-best` was
    # what `mixer-flat` is now.
    "mixer-best": {"model": "mixer-pyramid",
                   "model_args": {"patch": 4, "stride": 2, "dim": 96, "depth": 2, "depth2": 6, "token_hidden": 128,
                                  "token_hidden2": 128, "expansion": 2},
                   **MIXER_RECIPE},
    # The same training with the one-stage Mixer: 4x4 patches every 2 pixels (169 tokens, cut out by unfold),
    # better on validation than every 4 pixels for each of 3 seeds (99.04/98.98/99.28% against
    # 98.72/98.84/99.10%), at 3.5x the multiply-adds: 53-55 minutes on 2 cores of an AVX512-BF16 EPYC, about 4
    # on an H200 (docs/results.md). `--model-arg stride=4` gives `mixer-best` as it was until 2026-11-30.
    "mixer-flat": {"model": "mixer",
                   "model_args": {"patch": 4, "stride": 2, "dim": 128, "depth": 4, "token_hidden": 128,
                                  "channel_hidden": 256},
                   **MIXER_RECIPE},
}

# What each preset is for, in a line (`kmnist models`); results and times are in docs/results.md.
PRESET_SUMMARIES: dict[str, str] = {
    "report-final": "the report's final configuration, which is also the default: its Mixer, Adam, 20 epochs",
    "report-row1": "the report's Table 4.1, row 1",
    "report-row2": "the report's Table 4.1, row 2",
    "report-row3": "the report's Table 4.1, row 3",
    "quick-cnn": "a small CNN for one epoch: past the report's best in under 30 s on 2 CPU cores",
    "cnn-fast-cpu": "the best CNN for about 15 minutes of training on 2 CPU cores (with bf16 units)",
    "cnn-best": "a pre-activation ResNet-18 for 60 epochs: GPU-sized",
    "mixer-best": "all-MLP, no convolution: the Mixer in two stages, the best such model here",
    "mixer-flat": "all-MLP, no convolution: the one-stage Mixer with overlapping patches",
}


def option_flag(field: str) -> str:
    """The command-line option of a config field: batch_size -> --batch-size."""
    return "--" + field.replace("_", "-")


def preset_options(name: str) -> list[str]:
    """The `kmnist train` options that a preset stands for (none for the defaults)."""
    options: list[str] = []
    for key, value in PRESETS[name].items():
        if key == "model_args":
            for argument, setting in value.items():
                options += ["--model-arg", f"{argument}={setting}"]
        elif isinstance(value, bool):
            options.append(option_flag(key if value else f"no_{key}"))
        else:
            options += [option_flag(key), str(value)]
    return options


# Settings that change where or how fast a run computes, not what: they may differ on resume.
PLACEMENT_FIELDS = ("device", "threads", "eval_batch_size", "compile")


def complete_model_args(model: str, model_args: dict[str, Any]) -> dict[str, Any]:
    """A model's arguments with its own defaults filled in, so `{}` and `{"patch": 4}` are the same when 4 is
    the default; as saved where this version does not know the model or an argument."""
    from kmnist.models import resolve_model_args

    try:
        return resolve_model_args(model, model_args)
    except (KmnistError, KeyError):
        return dict(model_args)


def same_experiment(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two saved configs describe the same computation (placement aside). A field missing from one,
    saved before the field existed, counts as its default, which is what such a run computed; model
    arguments count with the model's defaults filled in."""
    defaults = TrainConfig().to_dict()

    def full(config: dict[str, Any]) -> dict[str, Any]:
        config = {k: v for k, v in {**defaults, **config}.items() if k not in PLACEMENT_FIELDS}
        return {**config, "model_args": complete_model_args(config["model"], config.get("model_args") or {})}

    return full(a) == full(b)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def coerce(name: str, value: Any) -> Any:
    """Convert a value (often a string from the command line) to the type of config field `name`."""
    if name not in FIELDS:
        raise KmnistError(f"unknown config field {name!r}; known: {', '.join(FIELDS)}")
    default = FIELDS[name].default
    if default is dataclasses.MISSING:  # model_args
        if not isinstance(value, dict):
            raise KmnistError(f"{name} must be a table of name = value")
        return value
    kind = type(default)
    if isinstance(value, str) and kind is not str:
        return parse_scalar(value, kind, name)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise KmnistError(f"{name} must be of type {kind.__name__}, got {value!r}")
    return value


def parse_scalar(text: str, kind: type | None = None, name: str = "value") -> Any:
    """Parse a command-line string as bool/int/float (or the given type); strings stay strings."""
    lowered = text.strip().lower()
    if kind is bool or (kind is None and lowered in ("true", "false")):
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise KmnistError(f"{name} must be true or false, got {text!r}")
    if kind in (int, float) or kind is None:
        for convert in ((int, float) if kind is None else (kind,)):
            try:
                return convert(text)
            except ValueError:
                if kind is float:
                    break
        if kind is int:
            try:
                as_float = float(text)
            except ValueError:
                as_float = None
            if as_float is not None and as_float.is_integer():
                return int(as_float)
        if kind is not None:
            raise KmnistError(f"{name} must be a {'whole ' if kind is int else ''}number, got {text!r}")
    return text


def read_user_text(path: Path, what: str) -> str:
    """A text file a person wrote: UTF-8, with or without the byte-order mark some editors put first."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        encoding = " (it looks like UTF-16)" if path.read_bytes()[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise KmnistError(f"{what} {path} is not UTF-8 text{encoding}; save it as UTF-8") from None


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML or YAML file of config fields (and optionally `preset = "name"`)."""
    path = Path(path)
    if path.is_dir():
        raise KmnistError(f"config file {path} is a folder; name a .toml or .yaml file")
    if not path.is_file():
        raise KmnistError(f"config file not found: {path}")
    text = read_user_text(path, "config file")
    try:
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        elif path.suffix.lower() in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise KmnistError(f"config file must end in .toml, .yaml or .yml: {path}")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as error:
        reason = str(error).splitlines()[0]
        raise KmnistError(f"cannot parse config file {path}: {reason}") from None
    if not isinstance(data, dict):
        raise KmnistError(f"config file {path} must hold a table of name = value")
    return data


def split_preset(file_values: dict[str, Any] | None, preset: str | None) -> tuple[str | None, dict[str, Any]]:
    """(the preset: the one given, else the config file's; the file's other values)."""
    values = dict(file_values or {})
    named = values.pop("preset", None)
    return preset or named, values


def resolve_config(
    preset: str | None = None,
    file_values: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
    base: TrainConfig | None = None,
) -> TrainConfig:
    """Defaults, then the preset, then the config file, then command-line overrides (None = not given).

    Model arguments merge argument by argument across these layers (`--preset quick-cnn --model-arg
    width=8` keeps the preset's depth), and a layer that names another model starts from that
    model's own defaults.
    """
    preset, file_values = split_preset(file_values, preset)
    if preset is not None and preset not in PRESETS:
        raise KmnistError(f"unknown preset {preset!r}; known: {', '.join(sorted(PRESETS))}")
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    config = base or TrainConfig()
    model, model_args = config.model, dict(config.model_args)
    values: dict[str, Any] = {}
    for layer in (PRESETS[preset] if preset is not None else {}, file_values, given):
        layer = dict(layer)
        layer_args = layer.pop("model_args", None) or {}
        if not isinstance(layer_args, dict):
            raise KmnistError("model_args must be a table of name = value")
        if "model" in layer and layer["model"] != model:
            model, model_args = layer["model"], {}
        model_args.update(layer_args)
        values.update(layer)
    typed = {name: coerce(name, value) for name, value in values.items()}
    return dataclasses.replace(config, **typed, model_args=model_args)


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Rebuild a config saved by `TrainConfig.to_dict` (unknown keys are an error)."""
    return resolve_config(file_values=data)
