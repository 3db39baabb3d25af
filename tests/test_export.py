"""ONNX export: the same predictions as PyTorch for any batch size, and `kmnist export` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import synthetic_arrays
from kmnist.checkpoint import load_checkpoint
from kmnist.cli import main
from kmnist.export import compare_with_torch, to_onnx

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")


def test_onnx_matches_pytorch_for_any_batch_size(tiny_checkpoint: Path) -> None:
    payload = load_checkpoint(tiny_checkpoint)
    model = to_onnx(payload)
    images, _ = synthetic_arrays(300, 10, seed=5)
    comparison = compare_with_torch(model, payload, images, batch_size=128)  # batches of 128, 128 and 44
    assert comparison == {"count": 300, "mismatches": 0, "max_abs_logit_diff": pytest.approx(0, abs=1e-4)}

    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    for batch in (1, 7):
        logits, probabilities = session.run(None, {"images": images[:batch].astype(np.float32)})
        assert logits.shape == probabilities.shape == (batch, 10)
        assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    metadata = {entry.key: entry.value for entry in onnx.load_from_string(model).metadata_props}
    assert json.loads(metadata["class_names"]) == payload["class_names"] and metadata["dataset"] == "kmnist"


def test_export_command_validates_on_the_test_split(tiny_checkpoint: Path, data_dir: Path, tmp_path: Path,
                                                     capsys) -> None:
    out = tmp_path / "exported" / "model.onnx"
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):  # the test split is all it needs
        (data_dir / "kmnist" / name).unlink()
    common = [str(tiny_checkpoint), "--data-dir", str(data_dir), "--skip-md5"]
    code = main(["export", *common, "--onnx", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "same predictions as PyTorch  200/200" in captured.out  # the synthetic test split holds 200 images
    assert "max absolute logit difference" in captured.out and out.is_file()

    # A tolerance no model can meet: the check fails, one line, and nothing is written.
    refused = tmp_path / "refused.onnx"
    code = main(["export", *common, "--onnx", str(refused), "--tolerance", "1e-300"])  # ONNX Runtime is not bit-exact
    captured = capsys.readouterr()
    assert code != 0 and captured.err.count("\n") == 1 and "differs from PyTorch" in captured.err
    assert not refused.exists() and not list(tmp_path.glob("*.part"))


def test_export_without_data_is_one_line(tiny_checkpoint: Path, tmp_path: Path, offline: None, capsys) -> None:
    code = main(["export", str(tiny_checkpoint), "--onnx", str(tmp_path / "m.onnx"), "--data-dir",
                 str(tmp_path / "nothing")])
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1 and "files missing" in err


def test_export_to_a_path_it_cannot_write_fails_before_the_work(tiny_checkpoint: Path, tmp_path: Path, offline: None,
                                                                capsys) -> None:
    # Checked before the data is loaded and the model exported and validated (tens of seconds on the real test set):
    # no data is given here, so a data error would mean the path was checked too late.
    for where, says in ((tmp_path, "is a folder"), (tmp_path / "taken" / "m.onnx", "is a file, not a folder")):
        (tmp_path / "taken").write_text("")
        code = main(["export", str(tiny_checkpoint), "--onnx", str(where), "--data-dir", str(tmp_path / "nothing")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and says in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no probe left behind
