"""Milliseconds per training step of the report's model (batch 128, Adam; bf16 autocast on CPUs with bf16
units, fp32 elsewhere, as `--precision auto` trains) in the ways of computing the same step that were
tried for the 2.5x target, side by side in one process.

    python benchmarks/report_model_step.py [--steps 60] [--rounds 2] [--precision auto] [--json OUT]

- eager: the model as `kmnist train` runs it (each hidden Linear + ReLU one oneDNN product,
  `kmnist.models.fused`);
- plain: the same model in plain PyTorch ops (Linear, then ReLU), as before that fusion;
- inplace-relu: plain, the hidden ReLUs writing over their input (one tensor less per MLP);
- left-matmul: plain, token mixing as W @ x on the (B, T, C) tensor instead of transpose + Linear + transpose;
- chunked-N: stem and its BatchNorm on the whole batch, the rest (per-sample independent) forward and
  backward in chunks of N images so the 512-wide activations stay in cache; the same gradients;
- compile: torch.compile of the whole model (default mode; it traces the plain ops).
- two-threads: stem and its BatchNorm on the whole batch, then each half of the batch forward and backward
  on a thread of its own, one core each (torch threads 1), instead of every operation split across both
  cores; the same gradients.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kmnist.config import PRECISIONS
from kmnist.cpu import keep_freed_memory
from kmnist.metrics import autocast_for, uses_bf16
from kmnist.models import create_model
from kmnist.models.fused import set_fused
from kmnist.models.mixer import patchify
from kmnist.runinfo import environment, hardware_summary


KNOWN = ("eager", "plain", "inplace-relu", "left-matmul", "compile", "two-threads")


def left_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    out = torch.matmul(layer.weight, x)
    return out + layer.bias.to(out.dtype)[:, None]


def make_step(variant: str, batch: tuple[torch.Tensor, torch.Tensor], precision: str):
    torch.manual_seed(0)
    model = create_model("report-mixer")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=5e-4, fused=True)
    images, labels = batch
    if variant in ("plain", "inplace-relu", "left-matmul", "compile"):
        set_fused(model, False)
    if variant == "inplace-relu":
        for block in model.blocks:
            block.mlp_tokens[1].inplace = block.mlp_channels[1].inplace = True
    if variant == "left-matmul":
        for block in model.blocks:
            def forward(x, block=block):
                hidden = x
                for layer in block.mlp_tokens:
                    hidden = left_linear(layer, hidden) if isinstance(layer, nn.Linear) else layer(hidden)
                x = x + hidden
                return x + block.mlp_channels(x)
            block.forward = forward
    run = torch.compile(model) if variant == "compile" else model
    chunk = int(variant.split("-")[1]) if variant.startswith("chunked") else 0
    worker = ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(1,)) if variant == "two-threads" else None

    def half(stem: torch.Tensor, labels: torch.Tensor) -> None:  # autocast is per thread: entered on each
        with autocast_for(torch.device("cpu"), precision):
            logits = model.head(model.blocks(stem).mean(dim=1))
            (F.cross_entropy(logits, labels, reduction="sum") / len(images)).backward()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast_for(torch.device("cpu"), precision):
            if worker:
                stem = model.stem(patchify(images, model.patch))
                stem = model.stem_norm(stem.transpose(1, 2)).transpose(1, 2)
                middle = len(images) // 2
                first, second = (part.detach().requires_grad_() for part in (stem[:middle], stem[middle:]))
                other = worker.submit(half, second, labels[middle:])
                half(first, labels[:middle])
                other.result()
                stem.backward(torch.cat([first.grad, second.grad]))
            elif not chunk:
                F.cross_entropy(run(images), labels).backward()
            else:
                stem = model.stem(patchify(images, model.patch))
                stem = model.stem_norm(stem.transpose(1, 2)).transpose(1, 2)
                detached = stem.detach().requires_grad_()
                for start in range(0, len(images), chunk):
                    part = slice(start, start + chunk)
                    logits = model.head(model.blocks(detached[part]).mean(dim=1))
                    (F.cross_entropy(logits, labels[part], reduction="sum") / len(images)).backward()
                stem.backward(detached.grad)
        optimizer.step()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per round (default 60)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all variants, interleaved (default 2)")
    parser.add_argument("--variants", default="eager,plain,inplace-relu,left-matmul,chunked-64,chunked-32,compile")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="auto: bf16 autocast on CPUs with bf16 units, else fp32 (default)")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    args = parser.parse_args()
    keep_freed_memory()
    batch = (torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,)))
    variants = args.variants.split(",")
    unknown = [name for name in variants if name not in KNOWN and not re.fullmatch(r"chunked-[1-9][0-9]*", name)]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(KNOWN)}, chunked-N")
    if args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be at least 1")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        parser.error(f"--json: no such directory: {Path(args.json).parent}")  # before minutes of measuring
    steps, times, warmup = {}, {name: [] for name in variants}, {}
    threads = torch.get_num_threads()
    for name in variants:
        steps[name] = make_step(name, batch, args.precision)
        torch.set_num_threads(1 if name == "two-threads" else threads)
        started = time.perf_counter()
        for _ in range(10):
            steps[name]()
        warmup[name] = time.perf_counter() - started
    for _ in range(args.rounds):
        for name in variants:
            torch.set_num_threads(1 if name == "two-threads" else threads)
            started = time.perf_counter()
            for _ in range(args.steps):
                steps[name]()
            times[name].append((time.perf_counter() - started) / args.steps * 1000)
    result = {"hardware": hardware_summary(environment()), "threads": threads, "torch": torch.__version__,
              "precision": args.precision, "bf16": uses_bf16(torch.device("cpu"), args.precision),
              "ms_per_step": times, "median_ms_per_step": {k: statistics.median(v) for k, v in times.items()},
              "warmup_seconds_10_steps": warmup}
    for name in variants:
        print(f"{name:>14}: {result['median_ms_per_step'][name]:6.2f} ms/step "
              f"(rounds: {', '.join(f'{t:.2f}' for t in times[name])}; first 10 steps {warmup[name]:.1f} s)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(result, out, indent=2)


if __name__ == "__main__":
    main()
