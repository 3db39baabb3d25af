"""Step-by-step finiteness checks of compiled `cnn-fast-cpu` training, to find where it goes NaN.

For `--compile reduce-overhead` and `--compile default`, train up to two epochs of the preset and,
at every step, check that the compiled forward's logits are finite and match the plain module's
(same weights, same batch), that every gradient and parameter is finite; print a line for the first
steps, every 50th, each short batch and the first bad one. It found that compiled training under
bf16 autocast had non-finite gradients from the first step (logits fine), on an H200 and on a CPU
(docs/results/gpu-h200/compile-nan-diag.log), which the fp32 max pool of `resnet-small` fixed.

    PYTHONPATH=src python3 benchmarks/compile_nan_probe.py --device cuda
    PYTHONPATH=src python3 benchmarks/compile_nan_probe.py --device cpu --precision bf16 --steps 3
"""

from __future__ import annotations

import argparse
import time

import torch

from kmnist.config import resolve_config
from kmnist.data import load_dataset
from kmnist.errors import KmnistError
from kmnist.metrics import autocast_for
from kmnist.train import Trainer


def probe(dataset, mode: str, device: str, precision: str, steps: int | None) -> tuple[int, int] | None:
    """The (epoch, step) of the first non-finite logits, gradients or weights, or None."""
    config = resolve_config(preset="cnn-fast-cpu",
                            overrides={"compile": mode, "device": device, "epochs": 2, "precision": precision})
    trainer = Trainer(config, dataset)
    started = time.perf_counter()
    trainer.warm_up()
    print(f"[{mode}] warm-up {time.perf_counter() - started:.1f} s", flush=True)
    trainer.model.train()
    for epoch in (1, 2):
        for step, (images, labels) in enumerate(trainer.batches(epoch)):
            if steps and step >= steps:
                break
            trainer.optimizer.zero_grad(set_to_none=True)
            trainer._mark_step()
            with autocast_for(trainer.device, config.precision):
                logits = trainer.forward(images)
            logits_ok = bool(torch.isfinite(logits).all())
            with torch.no_grad(), autocast_for(trainer.device, config.precision):
                plain = trainer.model(images)
            difference = float((plain.float() - logits.detach().float()).abs().max())
            loss = trainer.loss(logits.float(), labels)
            loss.backward()
            grads_ok = all(bool(torch.isfinite(p.grad).all()) for p in trainer.model.parameters() if p.grad is not None)
            trainer.optimizer.step()
            trainer.scheduler.step()
            weights_ok = all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())
            good = logits_ok and grads_ok and weights_ok
            if step < 3 or step % 50 == 0 or not good or len(labels) != config.batch_size:
                print(f"  epoch {epoch} step {step} batch {len(labels)} loss {float(loss):.4f} logits_ok={logits_ok} "
                      f"grads_ok={grads_ok} weights_ok={weights_ok} max|plain - compiled| {difference:.3g}", flush=True)
            if not good:
                return epoch, step
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=".data")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="auto", help="auto (bf16 on CUDA), fp32 or bf16")
    parser.add_argument("--steps", type=int, default=None, help="steps per epoch to check (default: all)")
    args = parser.parse_args()
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be at least 1")
    try:
        dataset = load_dataset("kmnist", args.data_dir, progress=False)
    except KmnistError as error:
        parser.exit(2, f"compile_nan_probe: error: {error}\n")
    for mode in ("reduce-overhead", "default"):
        try:
            print(f"[{mode}] first bad step: {probe(dataset, mode, args.device, args.precision, args.steps)}",
                  flush=True)
        except Exception as error:  # noqa: BLE001  (report and go on to the other mode)
            print(f"[{mode}] failed: {type(error).__name__}: {str(error)[:400]}", flush=True)


if __name__ == "__main__":
    main()
