"""Which BatchNorm statistics suit the weight average (--ema)? A small-width `cnn-fast-cpu` with --ema 0.999.

After every epoch, the validation and test accuracy of the averaged weights evaluated with
BatchNorm statistics (a) copied from the raw model at each step, (b) averaged like the weights
(what `kmnist train --ema` does), (c) recomputed on 30 training batches; and of (d) the raw model.

    PYTHONPATH=src python3 benchmarks/ema_bn_probe.py --width 8 --epochs 6 --data-dir .data
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from kmnist.config import resolve_config
from kmnist.data import load_dataset
from kmnist.errors import KmnistError
from kmnist.metrics import predict_logits
from kmnist.train import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=".data")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.width < 1 or args.epochs < 1:
        parser.error("--width and --epochs must be at least 1")
    try:
        dataset = load_dataset("kmnist", args.data_dir, progress=False)
    except KmnistError as error:
        parser.exit(2, f"ema_bn_probe: error: {error}\n")
    config = resolve_config(preset="cnn-fast-cpu", overrides={
        "epochs": args.epochs, "ema": 0.999, "device": args.device, "seed": args.seed,
        "model_args": {"width": args.width, "depth": 1}})
    trainer = Trainer(config, dataset)
    copied = copy.deepcopy(trainer.average.model)  # the average's weights with the raw model's statistics

    def accuracy(model: torch.nn.Module, split) -> float:
        logits = predict_logits(model, split.images, precision=config.precision, **trainer.normalization)
        return float((logits.argmax(1) == split.labels).float().mean() * 100)

    def recomputed(model: torch.nn.Module, batches: int = 30) -> torch.nn.Module:
        model = copy.deepcopy(model)
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
                module.momentum = None  # a plain mean over the batches
        model.train()
        with torch.no_grad():
            for step, (images, _) in enumerate(trainer.batches(10_000 + args.seed)):
                if step >= batches:
                    break
                model(images)
        return model.eval()

    update = trainer.average.update

    def update_both(model: torch.nn.Module) -> None:
        update(model)
        with torch.no_grad():
            for mine, averaged in zip(copied.parameters(), trainer.average.model.parameters()):
                mine.copy_(averaged)
            for mine, raw in zip(copied.buffers(), model.buffers()):
                mine.copy_(raw)

    trainer.average.update = update_both
    print("epoch     lr | validation: copied averaged recomputed    raw | test: copied averaged recomputed    raw")
    for epoch in range(1, args.epochs + 1):
        started = time.perf_counter()
        trainer.train_epoch(epoch)
        models = [copied.eval(), trainer.average.model, recomputed(trainer.average.model), trainer.model.eval()]
        val = [accuracy(model, trainer.val) for model in models]
        test = [accuracy(model, trainer.test) for model in models]
        columns = "".join(f"{v:>8.2f}" for v in val) + "   |" + "".join(f"{v:>8.2f}" for v in test)
        print(f"{epoch:5d} {trainer.optimizer.param_groups[0]['lr']:6.3f} |{columns}   "
              f"({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
