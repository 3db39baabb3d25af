"""Figures a person looks at: learning curves, confusion matrices, the most confidently wrong images."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

_FONT_READY = False


def _use_kana_font() -> None:
    """Use a font with kana so class characters render (matplotlib's default has none)."""
    global _FONT_READY
    if _FONT_READY:
        return
    try:
        import matplotlib_fontja  # noqa: F401  (registers IPAexGothic and makes it the default)
    except ImportError:  # characters then show as boxes, but the figure is still written
        pass
    _FONT_READY = True


def _save(figure: plt.Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


def learning_curves(history: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Accuracy and loss per epoch for train, validation and test, side by side (the report's Fig 4.x)."""
    epochs = [row["epoch"] for row in history]
    figure, (acc_axis, loss_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for split, style in (("train", "-"), ("val", "--"), ("test", ":")):
        accs = [row[f"{split}_acc"] for row in history]
        losses = [row[f"{split}_loss"] for row in history]
        if all(math.isnan(v) for v in accs):
            continue
        acc_axis.plot(epochs, accs, style, marker="o", markersize=3, label=split)
        loss_axis.plot(epochs, losses, style, marker="o", markersize=3, label=split)
    acc_axis.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    loss_axis.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    for axis in (acc_axis, loss_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def confusion_matrix(confusion: np.ndarray, class_names: Sequence[str], path: Path, title: str = "") -> Path:
    """Row-normalised confusion matrix, axes labelled with the class characters."""
    _use_kana_font()
    confusion = np.asarray(confusion, dtype=np.float64)
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1) * 100
    size = len(class_names)
    figure, axis = plt.subplots(figsize=(max(5, size * 0.45), max(4.5, size * 0.4)))
    image = axis.imshow(rates, cmap="Blues", vmin=0, vmax=100)
    figure.colorbar(image, ax=axis, label="% of true class")
    axis.set_xticks(range(size), class_names, fontsize=10 if size <= 10 else 6)
    axis.set_yticks(range(size), class_names, fontsize=10 if size <= 10 else 6)
    axis.set(xlabel="predicted", ylabel="true", title=title or "confusion matrix")
    if size <= 12:
        for row in range(size):
            for column in range(size):
                if confusion[row, column]:
                    axis.text(column, row, f"{int(confusion[row, column])}", ha="center", va="center", fontsize=7,
                              color="white" if rates[row, column] > 50 else "black")
    return _save(figure, path)


def confident_mistakes(images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray,
                       class_names: Sequence[str], path: Path, count: int = 36, title: str = "") -> Path:
    """A grid of the wrongly classified images with the highest predicted probability."""
    _use_kana_font()
    predicted = probabilities.argmax(axis=1)
    wrong = np.nonzero(predicted != labels)[0]
    wrong = wrong[np.argsort(-probabilities[wrong, predicted[wrong]])][:count]
    columns = 6
    rows = max(1, math.ceil(len(wrong) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 1.6, rows * 1.9), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, index in zip(axes.flat, wrong):
        axis.imshow(images[index], cmap="gray_r")
        guess = predicted[index]
        axis.set_title(f"true {class_names[labels[index]]}  pred {class_names[guess]}\n"
                       f"p={probabilities[index, guess]:.2f}  #{index}", fontsize=8)
    figure.suptitle(title or "most confidently wrong test images")
    return _save(figure, path)


def preprocessing_examples(befores: Sequence[np.ndarray], afters: Sequence[np.ndarray], before_titles: Sequence[str],
                           after_titles: Sequence[str], path: Path, title: str = "") -> Path:
    """Images as a person gives them (top row) and the 28x28 model inputs made from them (bottom row)."""
    _use_kana_font()
    figure, axes = plt.subplots(2, len(befores), figsize=(2.6 * len(befores), 5.6), squeeze=False)
    for column, (before, after) in enumerate(zip(befores, afters)):
        top, bottom = axes[0, column], axes[1, column]
        top.imshow(before, cmap="gray", vmin=0, vmax=255)
        bottom.imshow(after, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        top.set_title(before_titles[column], fontsize=8)
        bottom.set_title(after_titles[column], fontsize=8)
        for axis in (top, bottom):
            axis.set_xticks([])
            axis.set_yticks([])
    axes[0, 0].set_ylabel("as given")
    axes[1, 0].set_ylabel("model input (28x28)")
    figure.suptitle(title or "kmnist predict: preprocessing")
    return _save(figure, path)
