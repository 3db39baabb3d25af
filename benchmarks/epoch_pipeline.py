"""Seconds per training epoch: kmnist's in-memory tensor loop vs a per-sample Dataset/DataLoader pipeline.

Both feed the same model, optimiser and training step in one process, interleaved, so the ratio is
measured side by side. Usage:
    .venv/bin/python benchmarks/epoch_pipeline.py --data-dir ../shared/data [--repeats 3] [--precision fp32]
"""

from __future__ import annotations

import argparse
import json
import sys

from kmnist.bench import time_pipelines
from kmnist.config import resolve_config
from kmnist.data import load_dataset
from kmnist.runinfo import environment, hardware_summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--repeats", type=int, default=3, help="epochs timed per pipeline (median reported)")
    parser.add_argument("--max-batches", type=int, default=None, help="time only this many batches per epoch")
    parser.add_argument("--precision", default=None, help="fp32 or bf16 (default: the config's)")
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    args = parser.parse_args()
    config = resolve_config(overrides={"precision": args.precision})
    dataset = load_dataset("kmnist", args.data_dir)
    result = time_pipelines(config, dataset, repeats=args.repeats, max_batches=args.max_batches)
    env = environment()
    result.update(model=config.model, batch_size=config.batch_size, precision=config.precision,
                  hardware=hardware_summary(env), environment=env)
    medians = result["median_epoch_seconds"]
    print(f"{config.model}, batch {config.batch_size}, precision {config.precision}, on {result['hardware']}")
    print(f"  tensor loop        {medians['tensor']:.1f} s/epoch  (runs: "
          + ", ".join(f"{t:.1f}" for t in result["epoch_seconds"]["tensor"]) + ")")
    print(f"  per-sample loader  {medians['per-sample']:.1f} s/epoch  (runs: "
          + ", ".join(f"{t:.1f}" for t in result["epoch_seconds"]["per-sample"]) + ")")
    print(f"  speed-up           {result['speedup']:.2f}x (median of {args.repeats})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(result, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
