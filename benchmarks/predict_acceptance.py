"""Acceptance check of `kmnist predict`: the test set written out as image files, plain and in variants.

Each variant folder goes through the real command line (`kmnist predict DIR --json`); its accuracy is
compared with in-memory evaluation (`kmnist evaluate`) of the same checkpoint.

    python benchmarks/predict_acceptance.py runs/.../best.pt --data-dir ../shared/data --work /tmp/kmnist-files \\
        --out docs/serving-predict-acceptance.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

OFFCENTRE_CANVAS = 64  # pixels per side of the black canvas the 28x28 image is pasted into


def write_variant(name: str, images: np.ndarray, labels: np.ndarray, folder: Path) -> None:
    """One file per test image, named <index>-<label>.<ext>, in the variant's style."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index, (image, label) in enumerate(zip(images, labels)):
        stem = folder / f"{index:05d}-{label}"
        if name == "plain":  # greyscale PNG, exactly the dataset's pixels
            Image.fromarray(image).save(f"{stem}.png")
        elif name == "inverted":  # dark ink on white
            Image.fromarray(255 - image).save(f"{stem}.png")
        elif name == "upscaled_4x":  # 112x112, bicubic
            Image.fromarray(image).resize((112, 112), Image.Resampling.BICUBIC).save(f"{stem}.png")
        elif name == "rgb_jpeg":  # three channels, lossy at Pillow's default quality (75)
            Image.fromarray(image).convert("RGB").save(f"{stem}.jpg", quality=75)
        elif name == "padded_offcentre":  # pasted at a random place on a larger black canvas
            canvas = np.zeros((OFFCENTRE_CANVAS, OFFCENTRE_CANVAS), dtype=np.uint8)
            row, column = rng.integers(0, OFFCENTRE_CANVAS - 28 + 1, size=2)
            canvas[row:row + 28, column:column + 28] = image
            Image.fromarray(canvas).save(f"{stem}.png")
        else:
            raise ValueError(name)


VARIANTS = ("plain", "inverted", "upscaled_4x", "rgb_jpeg", "padded_offcentre")


def kmnist(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kmnist", *args], capture_output=True, text=True, timeout=1800)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--work", required=True, help="folder for the image files (about 60 MB)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()

    from kmnist.data import load_dataset

    test = load_dataset("kmnist", args.data_dir, download=False, progress=False, test_only=True).test
    images, labels = test.images.numpy(), test.labels.numpy()
    evaluation = kmnist("evaluate", args.checkpoint, "--data-dir", args.data_dir, "--json",
                        "--out", str(Path(args.work) / "evaluation"))
    if evaluation.returncode:
        raise SystemExit(evaluation.stderr)
    in_memory = json.loads(evaluation.stdout)["accuracy"]
    rows = []
    for name in VARIANTS:
        folder = Path(args.work) / name
        if not folder.is_dir() or len(list(folder.iterdir())) != len(images):
            write_variant(name, images, labels, folder)
        started = time.perf_counter()
        run = kmnist("predict", args.checkpoint, str(folder), "--json", "--top-k", "1")
        seconds = time.perf_counter() - started
        report = json.loads(run.stdout)
        predicted = {Path(r["path"]).name: r["top"][0]["class_index"] for r in report["results"] if "top" in r}
        correct = sum(predicted.get(path.name) == int(path.stem.split("-")[1]) for path in folder.iterdir())
        accuracy = correct / len(images) * 100
        rows.append({"variant": name, "files": len(images), "failed": report["failed"], "accuracy": round(accuracy, 2),
                     "difference": round(accuracy - in_memory, 2), "seconds": round(seconds, 1)})
        print(f"{name:18s} accuracy {accuracy:6.2f}%  ({accuracy - in_memory:+.2f} points)  "
              f"{report['failed']} failed  {seconds:.1f} s", flush=True)
    result = {"checkpoint": args.checkpoint, "in_memory_accuracy": round(in_memory, 2), "variants": rows,
              "date": time.strftime("%Y-%m-%d")}
    print(f"in-memory evaluation: {in_memory:.2f}%")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    plain_ok = abs(rows[0]["difference"]) <= 1
    variants_ok = all(abs(row["difference"]) <= 3 for row in rows[1:])
    return 0 if plain_ok and variants_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
