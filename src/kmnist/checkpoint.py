"""Self-describing checkpoints: written atomically, read without unpickling arbitrary objects."""

from __future__ import annotations

import math
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kmnist import __version__
from kmnist.errors import KmnistError
from kmnist.files import atomic_writer
from kmnist.models import create_model

FORMAT = "kmnist-checkpoint"
FORMAT_VERSION = 1


def atomic_torch_save(payload: Any, path: str | Path) -> None:
    """torch.save through a temporary file and a rename: a crash never leaves half a checkpoint."""
    with atomic_writer(path) as out:
        torch.save(payload, out)


def make_checkpoint(model: nn.Module, *, model_name: str, model_args: dict[str, Any], class_names: list[str],
                    dataset: str, normalization: dict[str, float], config: dict[str, Any],
                    epoch: int, metrics: dict[str, Any], training_state: dict[str, Any] | None = None) -> dict:
    """Everything needed to rebuild and use the model, and (optionally) to resume training."""
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kmnist_version": __version__,
        "torch_version": str(torch.__version__),
        "model": model_name,
        "model_args": dict(model_args),
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "dataset": dataset,
        "normalization": dict(normalization),
        "config": config,
        "epoch": epoch,
        "metrics": dict(metrics),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    if training_state is not None:
        payload["training_state"] = training_state
    return payload


# What every reader of a checkpoint relies on, and its type.
FIELD_TYPES = {"model": str, "model_args": dict, "num_classes": int, "state_dict": dict, "class_names": list,
               "dataset": str, "normalization": dict, "config": dict}


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint with torch.load(weights_only=True); anything else is a one-line error."""
    path = Path(path)
    if path.is_dir():
        raise KmnistError(f"{path} is a folder, not a checkpoint file (e.g. {path / 'best.pt'})")
    if not path.is_file():
        raise KmnistError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; its directory is at the end
        raise KmnistError(f"{path}: not a readable kmnist checkpoint (not a whole file written by torch.save: "
                          f"another kind of file, or cut short)")
    with zipfile.ZipFile(path) as archive:  # torch.save stores its entries; packed ones could unpack to any size
        entries = archive.infolist()
    if any(entry.compress_type != zipfile.ZIP_STORED for entry in entries) or \
            sum(entry.file_size for entry in entries) > path.stat().st_size:
        raise KmnistError(f"{path}: not a readable kmnist checkpoint (compressed entries: torch.save writes none)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, IndexError,
            KeyError, TypeError, AttributeError) as error:  # the weights-only unpickler on a damaged or foreign file
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        # What the weights-only unpickler refused to build ("Unsupported global", "unsupported GLOBAL os.system").
        reason = next((line for line in lines if "unsupported global" in line.lower()), lines[0])
        raise KmnistError(f"{path}: not a readable kmnist checkpoint ({reason[:200]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise KmnistError(f"{path}: not a kmnist checkpoint (no '{FORMAT}' header)")
    version = payload.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise KmnistError(f"{path}: a kmnist checkpoint whose format_version is not a number ({version!r})")
    if version > FORMAT_VERSION:
        raise KmnistError(f"{path}: checkpoint format {version} is newer than this kmnist reads")
    for name, kind in FIELD_TYPES.items():
        if not isinstance(payload.get(name), kind) or isinstance(payload.get(name), bool):
            raise KmnistError(f"{path}: a kmnist checkpoint without a readable {name!r} (edited, or written by "
                              "something else)")
    problem = field_problem(payload)
    if problem:
        raise KmnistError(f"{path}: a kmnist checkpoint whose {problem} (edited, or written by something else)")
    return payload


def field_problem(payload: dict) -> str | None:
    """What makes the checkpoint's fields disagree with each other or with what they mean, if anything."""
    names, count = payload["class_names"], payload["num_classes"]
    if count < 1 or len(names) != count or not all(isinstance(name, str) and name for name in names):
        return f"class_names are not {count} names of classes"
    stats = payload["normalization"]
    numbers = [stats.get(key) for key in ("mean", "std")]
    if not all(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
               for value in numbers) or numbers[1] <= 0:
        return "normalization is not a finite mean and a positive std"
    config = payload["config"]
    if not all(isinstance(config.get(key), int) and not isinstance(config.get(key), bool) for key in ("seed", "val_size")):
        return "config has no whole seed and val_size"
    return None


def model_from_checkpoint(payload: dict, expected_model: str | None = None, source: str = "checkpoint") -> nn.Module:
    """Rebuild the model a checkpoint describes and load its weights (in eval mode)."""
    name = payload["model"]
    if expected_model is not None and expected_model != name:
        raise KmnistError(f"{source} holds model {name!r}, not {expected_model!r}")
    # The shapes first, on a model without storage: model arguments edited to ask for gigabytes are refused
    # before anything is allocated.
    with torch.device("meta"):
        skeleton = create_model(name, num_classes=payload["num_classes"], **payload["model_args"])
    expected = {key: tuple(value.shape) for key, value in skeleton.state_dict().items()}
    given = {key: tuple(getattr(value, "shape", ())) for key, value in payload["state_dict"].items()}
    if expected != given:
        differing = sorted(set(expected) ^ set(given)) or [key for key in expected if expected[key] != given[key]]
        key = differing[0]
        raise KmnistError(f"{source}: weights do not fit model {name!r} ({key}: the model has "
                          f"{expected.get(key, 'no such tensor')}, the checkpoint {given.get(key, 'none')})")
    model = create_model(name, num_classes=payload["num_classes"], **payload["model_args"])
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise KmnistError(f"{source}: weights do not fit model {name!r} ({first[:200]})") from None
    return model.eval()
