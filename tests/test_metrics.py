"""Scores from predictions: accuracy, the confusion matrix's orientation, per-class and balanced accuracy."""

from __future__ import annotations

import math

import torch

from kmnist.metrics import accuracy, balanced_accuracy, confusion_matrix, per_class_accuracy


def test_per_class_and_balanced_accuracy_by_hand() -> None:
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2])  # class 3 has no examples
    predicted = torch.tensor([0, 0, 0, 1, 1, 3, 2])
    confusion = confusion_matrix(predicted, labels, 4)
    assert confusion.tolist() == [[3, 1, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0]]  # row: true, column: predicted
    per_class = per_class_accuracy(confusion).tolist()
    assert per_class[:3] == [75.0, 50.0, 100.0] and math.isnan(per_class[3])  # recall, not precision (class 0: 3/3)
    assert balanced_accuracy(confusion) == (75.0 + 50.0 + 100.0) / 3  # over the classes present
    assert accuracy(predicted, labels) == 100 * 5 / 7
    assert accuracy(torch.tensor([1] * 5000), torch.tensor([1] * 4771 + [0] * 229)) == 95.42  # exact, not float32's
