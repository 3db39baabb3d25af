"""`kmnist predict` end to end: files and folders in batches, text and JSON output, one-line errors per bad file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import synthetic_arrays
from kmnist.cli import main
from kmnist.imageprep import prepare_file
from kmnist.predict import Classifier, expand_inputs


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Seven synthetic characters as PNG, four of them dark on light, one in a subfolder, one hidden."""
    images, _ = synthetic_arrays(7, 10, seed=3)
    folder = tmp_path / "images"
    (folder / "more").mkdir(parents=True)
    for index, image in enumerate(images[:5]):
        Image.fromarray(image if index % 2 else 255 - image).save(folder / f"char{index}.png")
    Image.fromarray(images[5]).convert("RGB").save(folder / "more" / "char5.jpg", quality=90)
    Image.fromarray(images[6]).save(folder / ".hidden.png")
    return folder


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_folder_in_batches_matches_in_memory_prediction(tiny_checkpoint: Path, image_folder: Path, capsys) -> None:
    code, out, err = run_cli(["predict", str(tiny_checkpoint), str(image_folder), "--json", "--batch-size", "2",
                              "--top-k", "4"], capsys)
    assert code == 0, err
    report = json.loads(out)
    paths = [Path(result["path"]).name for result in report["results"]]
    assert paths == [f"char{i}.png" for i in range(5)]  # sorted; subfolders and hidden files left out
    assert report["failed"] == 0 and report["dataset"] == "kmnist"
    classifier = Classifier.from_file(tiny_checkpoint)
    expected = classifier.probabilities(np.stack([prepare_file(image_folder / name) for name in paths]))
    for result, row in zip(report["results"], expected):
        assert len(result["top"]) == 4
        assert [entry["class_index"] for entry in result["top"]] == list(np.argsort(-row)[:4])
        assert result["top"][0]["probability"] == pytest.approx(float(row.max()), abs=1e-6)
        assert result["top"][0]["character"] == classifier.class_names[int(row.argmax())]


def test_text_output_recursive_and_preprocessed_images(tiny_checkpoint: Path, image_folder: Path, tmp_path: Path,
                                                       capsys) -> None:
    seen = tmp_path / "seen"
    code, out, err = run_cli(["predict", str(tiny_checkpoint), str(image_folder), "--recursive", "--top-k", "2",
                              "--save-preprocessed", str(seen)], capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 6 and lines[-1].startswith(str(image_folder / "more" / "char5.jpg"))
    classes = Classifier.from_file(tiny_checkpoint).class_names
    for line in lines:
        assert line.count("%") == 2 and any(f"{character}[" in line for character in classes)
    saved = sorted(seen.iterdir())
    assert len(saved) == 6 and Image.open(saved[0]).size == (28, 28)


def test_bad_files_get_one_line_each_and_the_rest_still_run(tiny_checkpoint: Path, image_folder: Path,
                                                           tmp_path: Path, capsys) -> None:
    (image_folder / "notes.txt").write_text("a folder's other files are not inputs")
    named = tmp_path / "named.txt"
    named.write_text("not an image")  # named on the command line: an input, whatever its name
    good = image_folder / "char1.png"
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    empty_folder = tmp_path / "empty"
    empty_folder.mkdir()
    notes_only = tmp_path / "notes-only"
    notes_only.mkdir()
    (notes_only / "labels.csv").write_text("file,label\n")
    code, out, err = run_cli(["predict", str(tiny_checkpoint), str(image_folder), str(named), str(truncated),
                              str(tmp_path / "missing.png"), str(empty_folder), str(notes_only)], capsys)
    assert code == 1
    assert len(out.strip().splitlines()) == 5  # every good image still classified
    errors = err.strip().splitlines()
    assert "Traceback" not in err
    assert len(errors) == 6  # one per bad input, then the count
    assert "named.txt: not an image" in errors[0]
    assert "truncated.png: cannot decode" in errors[1]
    assert "missing.png: no such file" in errors[2]
    assert "empty: folder holds no files" in errors[3]
    assert "notes-only: folder holds no image files (1 other file(s))" in errors[4]
    assert errors[5] == "kmnist predict: 5 of 10 file(s) could not be used"

    code, out, err = run_cli(["predict", str(tiny_checkpoint), str(truncated), "--json"], capsys)
    assert code == 1 and json.loads(out)["results"][0]["error"].startswith("cannot decode")


@pytest.mark.parametrize("extra, fragment", [
    (["--top-k", "0"], "--top-k must be between 1 and 10"),
    (["--top-k", "11"], "--top-k must be between 1 and 10"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
])
def test_bad_options_give_one_line(tiny_checkpoint: Path, image_folder: Path, extra: list[str], fragment: str,
                                   capsys) -> None:
    code, _, err = run_cli(["predict", str(tiny_checkpoint), str(image_folder), *extra], capsys)
    assert code != 0 and err.count("\n") == 1 and fragment in err


def test_not_a_checkpoint(image_folder: Path, capsys) -> None:
    code, _, err = run_cli(["predict", str(image_folder / "char0.png"), str(image_folder)], capsys)
    assert code != 0 and err.count("\n") == 1 and "not a readable kmnist checkpoint" in err


def test_expand_inputs_keeps_argument_order(image_folder: Path) -> None:
    files = expand_inputs([image_folder / "char3.png", image_folder])
    assert [item.path.name for item in files][:2] == ["char3.png", "char0.png"]
    assert all(item.error is None for item in files)


def _edited(tiny_checkpoint: Path, folder: Path, name: str, **changes) -> Path:
    from kmnist.checkpoint import load_checkpoint

    payload = load_checkpoint(tiny_checkpoint)
    for key, value in changes.items():
        if key == "model_args":
            payload["model_args"] = {**payload["model_args"], **value}
        else:
            payload[key] = value
    torch.save(payload, folder / name)
    return folder / name


def test_edited_checkpoints_are_one_line_before_any_work(tiny_checkpoint: Path, image_folder: Path, tmp_path: Path,
                                                         capsys) -> None:
    import zipfile

    from kmnist.checkpoint import load_checkpoint

    normal = load_checkpoint(tiny_checkpoint)
    edits = {
        "class_names": ({"class_names": normal["class_names"][:5]}, "class_names are not 10 names"),
        "no_stats": ({"normalization": {}}, "normalization is not a finite mean and a positive std"),
        "zero_std": ({"normalization": {"mean": 0.2, "std": 0.0}}, "normalization is not a finite mean"),
        "no_config": ({"config": {}}, "config has no whole seed and val_size"),
        # Asked for gigabytes by its arguments: refused from the shapes, before the model is built.
        "huge": ({"model_args": {"token_hidden": 10**6}}, "weights do not fit model"),
    }
    for name, (changes, message) in edits.items():
        path = _edited(tiny_checkpoint, tmp_path, f"{name}.pt", **changes)
        code = main(["predict", str(path), str(image_folder)])
        err = capsys.readouterr().err
        assert code != 0 and len(err.strip().splitlines()) == 1 and message in err, (name, err)
    # The same entries packed: torch.load would unpack them, to any size; torch.save never packs.
    packed = tmp_path / "packed.pt"
    with zipfile.ZipFile(tiny_checkpoint) as source, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as target:
        for entry in source.infolist():
            target.writestr(entry.filename, source.read(entry.filename))
    code = main(["predict", str(packed), str(image_folder)])
    err = capsys.readouterr().err
    assert code != 0 and "compressed entries" in err and len(err.strip().splitlines()) == 1
