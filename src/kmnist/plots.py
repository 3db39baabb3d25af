"""Figures a person looks at: learning curves, confusion matrices, the most confidently wrong images."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from kmnist.files import atomic_writer

# Figures are made as matplotlib Figure objects, without pyplot: no backend or window, and nothing of the
# caller's matplotlib (a notebook's backend, its rcParams) is changed by importing or using this module.

Plot = TypeVar("Plot", bound=Callable[..., Path])


def _kana_font() -> dict[str, Any]:
    """rcParams for a font with kana, so class characters render (matplotlib's default has none)."""
    try:
        import matplotlib_fontja  # registers IPAexGothic (its own rc change is undone with the figure's context)
    except ImportError:  # characters then show as boxes, but the figure is still written
        return {}
    return {"font.family": getattr(getattr(matplotlib_fontja, "matplotlib_fontja", None), "FONT_NAME", "IPAexGothic")}


def _figure_settings(plot: Plot) -> Plot:
    """Draw under this module's settings only: the kana font, and text as text ("$" in a run name is not
    mathematics); the caller's rcParams are as they were afterwards."""
    @functools.wraps(plot)
    def drawn(*args: Any, **kwargs: Any) -> Path:
        with matplotlib.rc_context({"text.parse_math": False}):
            matplotlib.rcParams.update(_kana_font())
            return plot(*args, **kwargs)
    return drawn  # type: ignore[return-value]


def _save(figure: Figure, path: Path) -> Path:
    path = Path(path)
    with atomic_writer(path) as out:  # a cut-off write leaves the previous figure, not half a file
        figure.savefig(out, format=path.suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight")
    return path


def _epoch_axis(axis: Axes, epochs: Sequence[int]) -> None:
    """Whole epochs on the x axis: no tick at 1.5, and a run of one epoch is not spread over 0.95-1.05."""
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    if epochs and min(epochs) == max(epochs):
        axis.set_xlim(min(epochs) - 1, max(epochs) + 1)


@_figure_settings
def learning_curves(history: Sequence[dict[str, Any]], path: Path, title: str = "", balanced: bool = False) -> Path:
    """Accuracy and loss per epoch for train, validation and test, side by side (the report's Fig 4.x), with the
    epoch chosen by validation marked.

    With `balanced` (imbalanced datasets such as K49), validation and test balanced accuracy are drawn too, and
    the chosen epoch is the best by validation balanced accuracy.
    """
    epochs = [row["epoch"] for row in history]
    figure = Figure(figsize=(11, 4))
    acc_axis, loss_axis = figure.subplots(1, 2)
    for split, style in (("train", "-"), ("val", "--"), ("test", ":")):
        accs = [row[f"{split}_acc"] for row in history]
        losses = [row[f"{split}_loss"] for row in history]
        if all(math.isnan(v) for v in accs):
            continue
        lines = acc_axis.plot(epochs, accs, style, marker="o", markersize=3, label=split)
        loss_axis.plot(epochs, losses, style, marker="o", markersize=3, label=split)
        balanced_accs = [row.get(f"{split}_bal_acc", math.nan) for row in history]
        if balanced and not all(math.isnan(v) for v in balanced_accs):
            acc_axis.plot(epochs, balanced_accs, style, marker="s", markersize=3, alpha=0.6,
                          color=lines[0].get_color(), label=f"{split} (balanced)")
    # The epoch the run's result is taken from: the first with the best validation score (as training chose it).
    scores = np.array([row.get("val_bal_acc" if balanced else "val_acc", math.nan) for row in history], dtype=float)
    if len(scores) and not np.all(np.isnan(scores)):
        chosen = epochs[int(np.nanargmax(scores))]
        for axis in (acc_axis, loss_axis):
            axis.axvline(chosen, color="0.4", linestyle="-.", linewidth=1, label=f"chosen by validation (epoch {chosen})")
    acc_axis.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    loss_axis.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    for axis in (acc_axis, loss_axis):
        axis.grid(alpha=0.3)
        axis.legend()
        _epoch_axis(axis, epochs)
    if title:
        figure.suptitle(title)
    return _save(figure, path)


@_figure_settings
def confusion_matrix(confusion: np.ndarray, class_names: Sequence[str], path: Path, title: str = "") -> Path:
    """Row-normalised confusion matrix, axes labelled with the class characters."""
    confusion = np.asarray(confusion, dtype=np.float64)
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1) * 100
    size = len(class_names)
    figure = Figure(figsize=(max(5, size * 0.45), max(4.5, size * 0.4)))
    axis = figure.subplots()
    image = axis.imshow(rates, cmap="Blues", vmin=0, vmax=100)
    figure.colorbar(image, ax=axis, label="% of true class")
    axis.set_xticks(range(size), class_names, fontsize=10 if size <= 10 else 6)
    axis.set_yticks(range(size), class_names, fontsize=10 if size <= 10 else 6)
    axis.set(xlabel="predicted", ylabel="true")
    figure.suptitle(title or "confusion matrix")  # over the colorbar too: a long title does not run into it
    if size <= 12:
        for row in range(size):
            for column in range(size):
                if confusion[row, column]:
                    axis.text(column, row, f"{int(confusion[row, column])}", ha="center", va="center", fontsize=7,
                              color="white" if rates[row, column] > 50 else "black")
    return _save(figure, path)


@_figure_settings
def confident_mistakes(images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray,
                       class_names: Sequence[str], path: Path, count: int = 36, title: str = "") -> Path:
    """A grid of the wrongly classified images with the highest predicted probability."""
    predicted = probabilities.argmax(axis=1)
    wrong = np.nonzero(predicted != labels)[0]
    wrong = wrong[np.argsort(-probabilities[wrong, predicted[wrong]])][:count]
    columns = 6
    rows = max(1, math.ceil(len(wrong) / columns))
    figure = Figure(figsize=(columns * 1.6, rows * 1.9))
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, index in zip(axes.flat, wrong):
        axis.imshow(images[index], cmap="gray_r")
        guess = predicted[index]
        axis.set_title(f"true {class_names[labels[index]]}  pred {class_names[guess]}\n"
                       f"p={probabilities[index, guess]:.2f}  #{index}", fontsize=8)
    figure.suptitle(title or "most confidently wrong test images")
    return _save(figure, path)


@_figure_settings
def preprocessing_examples(befores: Sequence[np.ndarray], afters: Sequence[np.ndarray], before_titles: Sequence[str],
                           after_titles: Sequence[str], path: Path, title: str = "") -> Path:
    """Images as a person gives them (top row) and the 28x28 model inputs made from them (bottom row)."""
    figure = Figure(figsize=(2.6 * len(befores), 5.6))
    axes = figure.subplots(2, len(befores), squeeze=False)
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


@_figure_settings
def overlay_curves(curves: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Runs compared: validation accuracy, test accuracy and training loss per epoch, one line per configuration.

    Each curve is {"label", "epoch": [...], metric: (means, stds)}; the band is ± one std over seeds.
    """
    # A panel only for what some run recorded: runs without a validation split (--val-size 0) have no
    # validation panel unless another run has one.
    panels = [(metric, label) for metric, label in (("val_acc", "validation accuracy (%)"),
                                                    ("test_acc", "test accuracy (%)"),
                                                    ("train_loss", "training loss (cross-entropy)"))
              if any(not np.all(np.isnan(np.asarray(curve[metric][0], dtype=np.float64))) for curve in curves)]
    if not panels:  # nothing recorded at all: still one (empty) panel, so the figure is drawn
        panels = [("train_loss", "training loss (cross-entropy)")]
    figure = Figure(figsize=(16 * len(panels) / 3, 4.8))
    axes = figure.subplots(1, len(panels), squeeze=False)
    axes = axes[0]
    for curve in curves:
        for axis, (metric, _) in zip(axes, panels):
            means, stds = (np.asarray(values, dtype=np.float64) for values in curve[metric])
            if np.all(np.isnan(means)):
                continue
            (line,) = axis.plot(curve["epoch"], means, marker="o", markersize=2.5, linewidth=1.3,
                                label=curve["label"])
            axis.fill_between(curve["epoch"], means - stds, means + stds, color=line.get_color(), alpha=0.15,
                              linewidth=0)
    for axis, (_, label) in zip(axes, panels):
        axis.set(xlabel="epoch", title=label)
        _epoch_axis(axis, [epoch for curve in curves for epoch in curve["epoch"]])
        axis.grid(alpha=0.3)
    handles, labels = max((axis.get_legend_handles_labels() for axis in axes), key=lambda found: len(found[0]))
    if handles:
        figure.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8 if len(labels) > 8
                      else 9, bbox_to_anchor=(0.5, -0.02 - 0.045 * math.ceil(len(labels) / 4)))
    figure.suptitle(title or "runs compared (mean over seeds, band: ± one standard deviation)")
    return _save(figure, path)


@_figure_settings
def accuracy_versus(setting: str, series: dict[str, tuple[Sequence[float], Sequence[float], Sequence[float]]],
                    path: Path, title: str = "", dashed: Sequence[str] = ()) -> Path:
    """Accuracy (mean ± std over seeds) against one numeric setting, e.g. the patch size: name -> (values of
    the setting, means, stds); a line is dashed where its name starts with one in `dashed`."""
    figure = Figure(figsize=(7, 4.5))
    axis = figure.subplots()
    for name, (xs, means, stds) in series.items():
        axis.errorbar(xs, means, yerr=stds, marker="o", capsize=4,
                      linestyle="--" if name.startswith(tuple(dashed)) else "-", label=name)
    values = sorted({x for xs, _, _ in series.values() for x in xs})
    positive = all(v > 0 for v in values)
    if positive and max(values) / min(values) >= 8:
        axis.set_xscale("log", base=2)
    axis.set_xticks(list(values), [f"{v:g}" for v in values])
    axis.minorticks_off()
    axis.set(xlabel=setting, ylabel="accuracy (%)", title=title or f"accuracy against {setting}")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=9)
    return _save(figure, path)
