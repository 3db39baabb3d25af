"""Predictions for image files: a checkpoint's model as a classifier, and batched prediction over files and folders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from kmnist.checkpoint import load_checkpoint, model_from_checkpoint
from kmnist.errors import ImageError, KmnistError
from kmnist.imageprep import FORMATS, Limits, prepare_file
from kmnist.metrics import predict_logits


class Classifier:
    """A checkpoint's model for inference: KMNIST-style uint8 images in, class probabilities out. Thread-safe."""

    def __init__(self, payload: dict, source: str = "checkpoint"):
        self.model = model_from_checkpoint(payload, source=source)  # eval mode, never switched back
        self.class_names: list[str] = list(payload["class_names"])
        self.dataset: str = payload["dataset"]
        self.model_name: str = payload["model"]
        self.mean = float(payload["normalization"]["mean"])
        self.std = float(payload["normalization"]["std"])

    @classmethod
    def from_file(cls, path: str | Path) -> "Classifier":
        return cls(load_checkpoint(path), source=str(path))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def probabilities(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """uint8 (N, 28, 28) -> float32 (N, classes) softmax probabilities (computed in fp32)."""
        if not len(images):
            return np.zeros((0, self.num_classes), dtype=np.float32)
        logits = predict_logits(self.model, torch.from_numpy(np.ascontiguousarray(images)), self.mean, self.std,
                                batch_size=batch_size, precision="fp32")
        return torch.softmax(logits, dim=1).numpy()

    def top_k(self, probabilities: np.ndarray, k: int) -> list[dict[str, Any]]:
        """The k most probable classes of one image's probabilities, most probable first."""
        order = np.argsort(-probabilities, kind="stable")[:k]
        return [{"class_index": int(i), "character": self.class_names[i], "probability": float(probabilities[i])}
                for i in order]


@dataclass(frozen=True)
class FileInput:
    path: Path
    error: str | None = None  # set when the path cannot be used at all


def expand_inputs(inputs: Sequence[str | Path], recursive: bool = False) -> list[FileInput]:
    """Files as given, and the image files in given folders (by extension; sorted; hidden ones skipped), in
    argument order. A folder's other files (notes, label lists) are not inputs; a file named is one, whatever
    its name."""
    from PIL import Image

    # The extensions of the formats read (imageprep.FORMATS): a folder's .eps or .txt is not an input.
    image_suffixes = {suffix.lower() for suffix, name in Image.registered_extensions().items() if name in FORMATS}
    files: list[FileInput] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            found = sorted(p for p in path.glob(pattern) if p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            images = [p for p in found if p.suffix.lower() in image_suffixes]
            files.extend(FileInput(p) for p in images)
            if not images:
                files.append(FileInput(path, f"folder holds no image files ({len(found)} other file(s))" if found
                                       else "folder holds no files"))
        elif path.exists():
            files.append(FileInput(path))
        else:
            files.append(FileInput(path, "no such file or folder"))
    return files


def predict_files(classifier: Classifier, inputs: Sequence[str | Path], top_k: int = 3, batch_size: int = 256,
                  limits: Limits = Limits(), recursive: bool = False) -> Iterator[dict[str, Any]]:
    """One result per file, in order: {"path", "top": [...], "image": uint8 (28, 28)} or {"path", "error"}.

    Files are read and preprocessed in batches of batch_size, so memory stays bounded for any number of files.
    """
    if not 1 <= top_k <= classifier.num_classes:  # as serve refuses it: more classes than the model has is a mistake
        raise KmnistError(f"--top-k must be between 1 and {classifier.num_classes}, got {top_k}")
    if batch_size < 1:
        raise KmnistError(f"--batch-size must be at least 1, got {batch_size}")
    files = expand_inputs(inputs, recursive)
    for start in range(0, len(files), batch_size):
        results: list[dict[str, Any]] = []
        for item in files[start:start + batch_size]:
            if item.error:
                results.append({"path": str(item.path), "error": item.error})
                continue
            try:
                results.append({"path": str(item.path), "image": prepare_file(item.path, limits)})
            except ImageError as error:
                results.append({"path": str(item.path), "error": str(error)})
        good = [result for result in results if "image" in result]
        if good:
            probabilities = classifier.probabilities(np.stack([result["image"] for result in good]), batch_size)
            for result, row in zip(good, probabilities):
                result["top"] = classifier.top_k(row, top_k)
        yield from results
