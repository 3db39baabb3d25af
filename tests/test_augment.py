"""Batched augmentation and the training options built on it (mixup/cutmix, EMA, balanced sampling)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kmnist import runs
from kmnist.augment import AugmentSettings, augment, erase, mix, warp
from kmnist.config import TrainConfig
from kmnist.train import fit

from test_train import TINY, _drop_times


def _images() -> torch.Tensor:
    images = torch.zeros(8, 1, 28, 28)
    images[:, :, 10:18, 12:16] = 255.0
    return images


def test_identity_settings_change_nothing() -> None:
    generator = torch.Generator().manual_seed(0)
    images = _images()
    assert torch.allclose(warp(images, AugmentSettings(), generator), images, atol=1e-3)


def test_translation_moves_ink_without_inventing_any() -> None:
    generator = torch.Generator().manual_seed(0)
    images = _images()
    moved = warp(images, AugmentSettings(translate=3), generator)
    assert moved.shape == images.shape
    assert not torch.allclose(moved, images)
    # A shift of at most 3 pixels keeps the 8x4 stroke inside the frame: total ink is preserved.
    assert torch.allclose(moved.sum(dim=(1, 2, 3)), images.sum(dim=(1, 2, 3)), rtol=0.02)
    assert float(moved.min()) >= 0 and float(moved.max()) <= 255.0 + 1e-3


def test_each_image_gets_its_own_warp_and_same_seed_same_warp() -> None:
    settings = AugmentSettings(rotate=15, scale=0.1, shear=10, elastic=2)
    first = warp(_images(), settings, torch.Generator().manual_seed(1))
    again = warp(_images(), settings, torch.Generator().manual_seed(1))
    assert torch.equal(first, again)
    assert not torch.allclose(first[0], first[1])


def test_erase_blanks_rectangles_only_where_chosen() -> None:
    images = torch.full((64, 1, 28, 28), 100.0)
    erased = erase(images, 0.5, torch.Generator().manual_seed(0))
    blanked = (erased == 0).flatten(1).any(dim=1)
    assert 10 < int(blanked.sum()) < 54  # about half the images
    assert int((erased == 0).sum(dim=(1, 2, 3)).max()) <= 16 * 16
    assert torch.equal(augment(images, AugmentSettings(), torch.Generator()), images)


def test_mixup_and_cutmix_mix_labels_by_lam() -> None:
    images = torch.arange(4).float().view(4, 1, 1, 1).expand(4, 1, 28, 28).contiguous()
    labels = torch.arange(4)
    mixed, first, partners, lam = mix(images, labels, 0.4, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(first, labels) and 0 <= lam <= 1
    assert torch.allclose(mixed[:, 0, 0, 0], lam * labels.float() + (1 - lam) * partners.float())
    mixed, _, partners, lam = mix(images, labels, 0.0, 1.0, torch.Generator().manual_seed(0))
    pasted = (mixed != images).float().mean(dim=(1, 2, 3))  # share of each image replaced
    changed = partners != labels
    assert torch.allclose(pasted[changed], torch.full_like(pasted[changed], 1 - lam), atol=1e-6)


def test_training_with_every_option_learns_and_resumes_exactly(tiny_dataset, tmp_path: Path) -> None:
    options = dict(translate=2.0, rotate=8.0, scale=0.08, shear=5.0, elastic=1.0, erase=0.3, mixup=0.2, cutmix=0.5,
                   ema=0.9, label_smoothing=0.1, balanced_sampling=True, scheduler="cosine", warmup_epochs=0.5)
    config = TrainConfig(**{**TINY.to_dict(), **options})
    whole = fit(config, tiny_dataset, tmp_path / "whole")
    assert max(row["val_acc"] for row in whole) > 30  # chance is 10%

    def stop(row: dict) -> None:
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(config, tiny_dataset, tmp_path / "cut", on_epoch=stop)
    assert len(runs.read_metrics(tmp_path / "cut")) < len(whole)  # cut off: the resume has epochs to train
    resumed = fit(config, tiny_dataset, tmp_path / "cut", resume=True)
    assert _drop_times(resumed) == _drop_times(whole)


def test_clean_epochs_train_the_last_epochs_on_the_images_as_they_are(tiny_dataset) -> None:
    augmented = TrainConfig(**{**TINY.to_dict(), "translate": 2.0, "rotate": 8.0, "erase": 0.5, "mixup": 0.2})
    plain = _drop_times(fit(TrainConfig(**{**TINY.to_dict(), "epochs": 3}), tiny_dataset))
    everywhere = _drop_times(fit(augmented, tiny_dataset))
    all_clean = fit(TrainConfig(**{**augmented.to_dict(), "clean_epochs": 3}), tiny_dataset)
    assert _drop_times(all_clean) == plain  # nothing augmented or mixed: plain training, step for step
    last_clean = _drop_times(fit(TrainConfig(**{**augmented.to_dict(), "clean_epochs": 1}), tiny_dataset))
    assert last_clean[:2] == everywhere[:2] and last_clean[2] != everywhere[2]
    assert last_clean[2]["train_loss"] != plain[2]["train_loss"]  # it continues the augmented run


def test_ema_changes_what_is_evaluated(tiny_dataset) -> None:
    plain = fit(TrainConfig(**{**TINY.to_dict(), "epochs": 1}), tiny_dataset)
    averaged = fit(TrainConfig(**{**TINY.to_dict(), "epochs": 1, "ema": 0.99}), tiny_dataset)
    assert plain[0]["train_loss"] == averaged[0]["train_loss"]  # same training
    assert plain[0]["val_loss"] != averaged[0]["val_loss"]  # different weights evaluated


def test_weight_average_averages_batchnorm_statistics_like_weights() -> None:
    from kmnist.train import WeightAverage

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    average = WeightAverage(model, decay=0.9)
    average.updates = 100  # past the short-memory start: the decay is 0.9
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(2.0)  # the average starts from 0
        model[1].running_var.fill_(3.0)  # and from 1
    model[1].num_batches_tracked.fill_(7)
    averaged_weight = 0.9 * average.model[0].weight + 0.1 * model[0].weight
    average.update(model)
    torch.testing.assert_close(average.model[0].weight, averaged_weight)
    torch.testing.assert_close(average.model[1].running_mean, torch.full((2,), 0.2))
    torch.testing.assert_close(average.model[1].running_var, torch.full((2,), 1.2))
    assert int(average.model[1].num_batches_tracked) == 7  # a counter is copied, not averaged


def test_shift_images_moves_and_fills_with_background() -> None:
    from kmnist.metrics import shift_images

    images = torch.zeros(1, 28, 28, dtype=torch.uint8)
    images[0, 5, 7] = 200
    moved = shift_images(images, 1, -1)
    assert moved[0, 6, 6] == 200 and int(moved.sum()) == 200
    edge = torch.zeros(1, 28, 28, dtype=torch.uint8)
    edge[0, 0, 0] = 9
    assert int(shift_images(edge, -1, 0).sum()) == 0  # shifted out of frame, not wrapped around
    assert shift_images(images, -2, 2)[0, 3, 9] == 200 and int(shift_images(edge, 0, -2).sum()) == 0
    edge[0, 1, 1] = 7
    assert int(shift_images(edge, -2, -1).sum()) == 0 and shift_images(edge, 2, 1)[0, 3, 2] == 7


def test_tta_views_are_every_shift_of_up_to_two_pixels_nearest_first() -> None:
    from kmnist.metrics import TTA_SHIFTS

    assert len(TTA_SHIFTS) == len(set(TTA_SHIFTS)) == 25 and TTA_SHIFTS[0] == (0, 0)
    assert set(TTA_SHIFTS[:9]) == {(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}  # --tta 9 as before
    distances = [dy * dy + dx * dx for dy, dx in TTA_SHIFTS]
    assert distances == sorted(distances)


class _DominantClass(torch.nn.Module):
    """Names the class of the brightest of ten marker pixels: the dominant class of a mixed image."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images[:, 0, 0, :10] + 0 * self.unused


def test_train_accuracy_of_mixed_batches_counts_each_label_by_its_weight(monkeypatch) -> None:
    import kmnist.train
    from kmnist.data import Dataset, Split, read_classmap

    labels = torch.arange(640) % 10
    images = torch.zeros(640, 28, 28, dtype=torch.uint8)
    images[torch.arange(640), 0, labels] = 255  # one marker pixel per class
    dataset = Dataset("kmnist", read_classmap(None, "kmnist"), Split(images, labels), Split(images[:50], labels[:50]))
    batches = []
    monkeypatch.setattr(kmnist.train, "mix", lambda *args: batches.append(mix(*args)) or batches[-1])
    trainer = kmnist.train.Trainer(TrainConfig(val_size=0, batch_size=64, threads=1, precision="fp32", mixup=1.0),
                                   dataset)
    trainer.model = trainer.forward = _DominantClass()
    trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.0)
    trainer.scheduler = None
    _, accuracy = trainer.train_epoch(1)
    right = 0.0
    for mixed, first, partners, lam in batches:
        predicted = trainer.model(mixed).argmax(dim=1)
        assert bool(((predicted == first) | (predicted == partners)).all())  # the dominant one of the two
        right += lam * float((predicted == first).sum()) + (1 - lam) * float((predicted == partners).sum())
    assert len(batches) == 10 and any(lam < 0.5 for *_, lam in batches)  # the first label is not always the one
    assert accuracy == pytest.approx(right / 640 * 100, abs=1e-3)
