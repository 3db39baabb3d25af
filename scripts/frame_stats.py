"""How KMNIST characters sit in their 28x28 frame: bounding-box size and centre, centre of mass, peak ink.

These figures set predict's preprocessing target (docs/serving.md).

    python scripts/frame_stats.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse

import numpy as np

from kmnist.data import load_dataset


def frame_stats(images: np.ndarray, threshold: int = 0) -> dict[str, float]:
    """Statistics over uint8 images (N, 28, 28); ink is any pixel above threshold."""
    ink = images > threshold
    rows, columns = ink.any(axis=2), ink.any(axis=1)
    size = images.shape[1]
    top, bottom = rows.argmax(axis=1), size - 1 - rows[:, ::-1].argmax(axis=1)
    left, right = columns.argmax(axis=1), size - 1 - columns[:, ::-1].argmax(axis=1)
    height, width = bottom - top + 1, right - left + 1
    longer = np.maximum(height, width)
    tall = height >= width
    weights = images.astype(np.float64)
    total = weights.sum(axis=(1, 2))
    mass_row = (weights.sum(axis=2) * np.arange(size)).sum(axis=1) / total
    mass_column = (weights.sum(axis=1) * np.arange(size)).sum(axis=1) / total
    return {
        "box_height_mean": height.mean(), "box_width_mean": width.mean(),
        "longer_side_mean": longer.mean(), "longer_side_is_28": (longer == size).mean() * 100,
        "box_centre_across_mean": np.where(tall, (left + right) / 2, (top + bottom) / 2).mean(),
        "box_centre_across_std": np.where(tall, (left + right) / 2, (top + bottom) / 2).std(),
        "mass_row_mean": mass_row.mean(), "mass_row_std": mass_row.std(),
        "mass_column_mean": mass_column.mean(), "mass_column_std": mass_column.std(),
        "peak_is_255": (images.reshape(len(images), -1).max(axis=1) == 255).mean() * 100,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    args = parser.parse_args()
    images = load_dataset("kmnist", args.data_dir, download=False, progress=False).test.images.numpy()
    for threshold in (0, 51):
        print(f"ink = pixels > {threshold}, {len(images)} test images:")
        for name, value in frame_stats(images, threshold).items():
            print(f"  {name:24s} {value:7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
