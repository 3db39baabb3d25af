"""Seconds per training epoch: kmnist's in-memory tensor loop vs a per-sample Dataset/DataLoader pipeline.

Both feed the same model, optimiser and training step in one process, interleaved, so the ratio is
measured side by side. Run both comparisons of docs/benchmarks.md:
    .venv/bin/python benchmarks/epoch_pipeline.py --data-dir ../shared/data
It is `kmnist bench` twice: both sides in fp32 (what the in-memory batches and kmnist's kernels, the
fused Linear + ReLU, give without bf16) and kmnist's defaults (bf16 autocast on CPUs with native
bf16) against the per-sample pipeline in fp32.
"""

from __future__ import annotations

import argparse
import sys

from kmnist.cli import main as kmnist


def run() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--repeats", default="3", help="epochs timed per pipeline (median reported)")
    parser.add_argument("--markdown", default=None, help="append rows to this Markdown table")
    args = parser.parse_args()
    common = ["bench", "--data-dir", args.data_dir, "--repeats", args.repeats, "--no-progress"]
    if args.markdown:
        common += ["--markdown", args.markdown]
    for precision in ("fp32", "auto"):
        print(f"\n== kmnist loop in precision {precision} vs per-sample pipeline in fp32")
        code = kmnist([*common, "--precision", precision])
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(run())
