"""ONNX export of a checkpoint, normalisation included, and its validation against PyTorch with onnxruntime."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kmnist import __version__
from kmnist.checkpoint import load_checkpoint, model_from_checkpoint
from kmnist.data import IMAGE_SIZE, load_dataset
from kmnist.errors import KmnistError
from kmnist.files import atomic_writer

INPUT_NAME = "images"  # float32 (batch, 28, 28): pixel values 0-255, light ink on black, as in the dataset files
OUTPUT_NAMES = ("logits", "probabilities")  # both (batch, classes)
OPSET = 18


class PixelsToLogits(nn.Module):
    """The model behind the dataset's own normalisation, so an exported graph takes raw pixel values."""

    def __init__(self, model: nn.Module, mean: float, std: float):
        super().__init__()
        self.model = model
        self.offset = mean * 255  # the same arithmetic as kmnist.data.normalize, so results match bit for bit
        self.scale = std * 255

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (B, 28, 28) -> 2 x (B, classes)
        logits = self.model((images.unsqueeze(1) - self.offset) / self.scale)
        return logits, torch.softmax(logits, dim=1)


def to_onnx(payload: dict) -> bytes:
    """The checkpoint's model as a serialised ONNX model: dynamic batch dimension, self-describing metadata."""
    import onnx

    wrapper = PixelsToLogits(model_from_checkpoint(payload), **payload["normalization"]).eval()
    example = torch.zeros(2, IMAGE_SIZE, IMAGE_SIZE)
    batch = torch.export.Dim("batch", min=1)
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # its notes on optional torchvision ops are no user's concern
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(wrapper, (example,), dynamo=True, input_names=[INPUT_NAME],
                                        output_names=list(OUTPUT_NAMES), dynamic_shapes=({0: batch},),
                                        opset_version=OPSET, verbose=False)
    finally:
        exporter_log.setLevel(level)
    model = program.model_proto
    metadata = {
        "kmnist_version": __version__,
        "dataset": payload["dataset"],
        "model": payload["model"],
        "model_args": json.dumps(payload["model_args"]),
        "class_names": json.dumps(payload["class_names"], ensure_ascii=False),
        "input": "images: float32 (batch, 28, 28), pixel values 0-255, light ink on black (KMNIST style); "
                 "normalisation is inside the graph",
        "outputs": "logits, probabilities: float32 (batch, classes)",
    }
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    return model.SerializeToString()


def onnx_logits(model: bytes | str | Path, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Logits from onnxruntime (CPU) for uint8 images (N, 28, 28)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    source = model if isinstance(model, bytes) else str(model)
    session = onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    outputs = [session.run([OUTPUT_NAMES[0]], {INPUT_NAME: images[start:start + batch_size].astype(np.float32)})[0]
               for start in range(0, len(images), batch_size)]
    return np.concatenate(outputs)


def compare_with_torch(model: bytes | str | Path, payload: dict, images: np.ndarray, batch_size: int = 1000) -> dict[str, Any]:
    """Same predictions and the largest logit difference between the ONNX file and PyTorch (fp32, CPU)."""
    wrapper = PixelsToLogits(model_from_checkpoint(payload), **payload["normalization"]).eval()
    with torch.inference_mode():
        reference = np.concatenate([
            wrapper(torch.from_numpy(images[start:start + batch_size]).float())[0].numpy()
            for start in range(0, len(images), batch_size)
        ])
    exported = onnx_logits(model, images, batch_size)
    return {
        "count": len(images),
        "mismatches": int((reference.argmax(axis=1) != exported.argmax(axis=1)).sum()),
        "max_abs_logit_diff": float(np.abs(reference - exported).max()) if len(images) else 0.0,
    }


def export_checkpoint(checkpoint: str | Path, out: str | Path, data_dir: str | Path, check_md5: bool = True,
                      tolerance: float = 1e-4, batch_size: int = 1000) -> dict[str, Any]:
    """Export, then validate on the checkpoint dataset's whole test split; only a validated file is kept at `out`."""
    import onnxruntime

    if batch_size < 1:
        raise KmnistError(f"--batch-size must be at least 1, got {batch_size}")
    payload = load_checkpoint(checkpoint)
    test = load_dataset(payload["dataset"], data_dir, check_md5=check_md5, progress=False, test_only=True).test
    model = to_onnx(payload)
    comparison = compare_with_torch(model, payload, test.images.numpy(), batch_size)
    if comparison["mismatches"] or not comparison["max_abs_logit_diff"] <= tolerance:
        raise KmnistError(f"the ONNX model differs from PyTorch: {comparison['mismatches']} different "
                          f"predictions, max logit difference {comparison['max_abs_logit_diff']:.2e} "
                          f"(tolerance {tolerance:.0e}); nothing written")
    out = Path(out)
    try:
        with atomic_writer(out) as handle:
            handle.write(model)
    except OSError as error:
        raise KmnistError(f"cannot write {out}: {error.strerror or error}") from None
    return {"path": str(out), "bytes": out.stat().st_size, "opset": OPSET, "dataset": payload["dataset"],
            "split": "test", "input": f"{INPUT_NAME} float32 (batch, 28, 28) 0-255", "outputs": list(OUTPUT_NAMES),
            "onnxruntime_version": onnxruntime.__version__, **comparison}
