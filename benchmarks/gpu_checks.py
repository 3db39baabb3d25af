"""The GPU checks of the speed and accuracy work, in one call of a lent GPU machine.

Prepared on CPU-only machines and checked there with --smoke; the GPU numbers come from running
it where a GPU is lent (an estimated 10 minutes on one H100/H200; no step starts after --budget
seconds, and the JSON is rewritten after each step, so a cut-off call keeps what finished):

  1. `kmnist bench` of the report's model and of `cnn-fast-cpu` on CUDA: our loop against the
     per-sample DataLoader pipeline of the same model, side by side (target: >= 20x for the former),
     epochs timed on their first 100 batches; for `cnn-fast-cpu` also compiled with CUDA graphs
     (`--compile reduce-overhead`) beside eager;
  2. `--preset cnn-fast-cpu --compile reduce-overhead` on CUDA, seeds 0-2: training time and test
     accuracy of a fixed recipe (target: >= 99.0% mean in <= 10 s of training; compiling is timed apart);
  3. `--preset cnn-best`, seed 0: the GPU-sized single model (target: >= 99.4%);
  4. if the budget allows, step 2 again without compiling.

The KMNIST files must travel with the working tree: copy them into the ignored folder .data/
(`mkdir -p .data && cp -r ../shared/data/kmnist .data/`), name `.data` in the call's carry, and run

    PYTHONPATH=src python3 benchmarks/gpu_checks.py --data-dir .data --out $OUT

Everything lands in OUT/gpu_checks.json (each step's command, exit code, seconds and results),
OUT/gpu_checks.log, the bench JSON files, and the `kmnist report` of the runs (OUT/results.md,
OUT/report.html; the compiled runs in OUT/results-compiled.md); run directories go to a scratch
folder, as checkpoints need not come back.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from kmnist.cli import main as kmnist

# --smoke: the same steps on a CPU in a few minutes, to check this script before a GPU is lent.
SMOKE_BENCH = ["--max-batches", "3", "--repeats", "1"]
SMOKE_TRAIN = ["--epochs", "1", "--model-arg", "width=8"]
COMPILE = "reduce-overhead"  # torch.compile with CUDA graphs: launch overhead is what bounds small models on a GPU


def run_step(name: str, args: list[str], log: io.TextIOBase) -> dict:
    """Run one kmnist command, its output teed to the log as it comes; returns its exit code and seconds."""
    started = time.perf_counter()
    with contextlib.redirect_stdout(Tee(sys.stdout, log)), contextlib.redirect_stderr(Tee(sys.stderr, log)):
        print(f"\n== {name}: kmnist {' '.join(args)}", flush=True)
        try:
            code = kmnist(args)
        except Exception as error:  # noqa: BLE001  (one failing step must not lose the others' results)
            print(f"step failed: {type(error).__name__}: {error}")
            code = 1
    return {"command": ["kmnist", *args], "exit_code": code, "seconds": time.perf_counter() - started}


class Tee(io.TextIOBase):
    def __init__(self, *streams: io.TextIOBase):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=".data", help="folder holding kmnist/ (default .data)")
    parser.add_argument("--out", required=True, help="folder for gpu_checks.json and gpu_checks.log")
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu with --smoke")
    parser.add_argument("--budget", type=float, default=480, help="seconds after which no new step starts")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the fixed fast recipe (default 3)")
    parser.add_argument("--smoke", action="store_true", help="tiny steps, to check the script on a CPU")
    args = parser.parse_args()
    if args.seeds < 1 or args.budget <= 0:
        parser.error("--seeds must be at least 1 and --budget positive")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; check the script on a CPU with --device cpu --smoke")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="kmnist-gpu-"))
    common = ["--data-dir", args.data_dir, "--device", args.device, "--no-progress"]
    bench_extra = SMOKE_BENCH if args.smoke else ["--repeats", "3", "--max-batches", "100"]
    steps: list[tuple[str, list[str]]] = [
        ("bench report-final", ["bench", *common, *bench_extra, "--json", str(out / "bench-report-final.json")]),
        ("bench cnn-fast-cpu", ["bench", "--preset", "cnn-fast-cpu", *common, *bench_extra, "--compile", COMPILE,
                                "--json", str(out / "bench-cnn-fast-cpu.json")]),
    ]
    train_extra = SMOKE_TRAIN if args.smoke else []
    compiled_runs = [scratch / f"cnn-fast-cpu-compiled-s{seed}" for seed in range(args.seeds)]
    fast_runs = [scratch / f"cnn-fast-cpu-s{seed}" for seed in range(args.seeds)]
    for seed, run_dir in enumerate(compiled_runs):
        steps.append((f"cnn-fast-cpu compiled seed {seed}",
                      ["train", "--preset", "cnn-fast-cpu", "--seed", str(seed), "--compile", COMPILE, *common,
                       *train_extra, "--out", str(run_dir)]))
    steps.append(("cnn-best seed 0", ["train", "--preset", "cnn-best", "--seed", "0", *common, *train_extra,
                                      "--out", str(scratch / "cnn-best-s0")]))
    for seed, run_dir in enumerate(fast_runs):
        steps.append((f"cnn-fast-cpu seed {seed}", ["train", "--preset", "cnn-fast-cpu", "--seed", str(seed), *common,
                                                    *train_extra, "--out", str(run_dir)]))
    report: dict = {"smoke": args.smoke, "steps": {}}
    started = time.perf_counter()
    with open(out / "gpu_checks.log", "w", encoding="utf-8") as log:
        for name, step_args in steps:
            if time.perf_counter() - started > args.budget:
                report["steps"][name] = {"skipped": f"budget of {args.budget:.0f} s spent"}
                continue
            result = run_step(name, step_args, log)
            if step_args[0] == "train" and "--out" in step_args:
                run_dir = Path(step_args[step_args.index("--out") + 1])
                for file in ("summary.json", "environment.json"):
                    if (run_dir / file).is_file():
                        result[file.removesuffix(".json")] = json.loads((run_dir / file).read_text())
            report["steps"][name] = result
            (out / "gpu_checks.json").write_text(json.dumps(report, indent=2))
        # The project's own tables of the finished runs (mean ± std over the fixed recipe's seeds), whatever the
        # budget. Compiled runs get their own: `kmnist report` counts them as repeats of the eager ones.
        for suffix, run_dirs in (("", [*fast_runs, scratch / "cnn-best-s0"]), ("-compiled", compiled_runs)):
            finished = [run_dir for run_dir in run_dirs if (run_dir / "summary.json").is_file()]
            if finished:
                report["steps"]["report" + suffix] = run_step(
                    "report" + suffix, ["report", *map(str, finished), "--out", str(scratch / f"report{suffix}")], log)
                (out / "gpu_checks.json").write_text(json.dumps(report, indent=2))
    for suffix, name in (("", "results.md"), ("", "report.html"), ("-compiled", "results.md")):
        if (scratch / f"report{suffix}" / name).is_file():
            shutil.copy(scratch / f"report{suffix}" / name, out / name.replace(".", f"{suffix}.", 1))
    print_table(report, out)
    return 1 if any(step.get("exit_code") for step in report["steps"].values()) else 0


def print_table(report: dict, out: Path) -> None:
    print(f"\n== summary (full results: {out / 'gpu_checks.json'})")
    for name, step in report["steps"].items():
        if "skipped" in step:
            print(f"{name:<22} skipped: {step['skipped']}")
            continue
        line = f"{name:<22} exit {step['exit_code']}, {step['seconds']:.0f} s"
        summary = step.get("summary")
        if summary:
            line += (f"; training {summary['train_seconds']:.1f} s, test at best val {summary['test_acc_at_best_val']:.2f}%"
                     f", final epoch {summary['final_test_acc']:.2f}%")
            if summary.get("compile_seconds"):
                line += f", compiling {summary['compile_seconds']:.0f} s"
        print(line)
    for path in sorted(out.glob("bench-*.json")):
        bench = json.loads(path.read_text())
        medians = bench["median_epoch_seconds"]
        print(f"{path.stem:<22} ours {medians['tensor']:.2f} s/epoch, per-sample {medians.get('per-sample', 0):.2f} "
              f"s/epoch, {bench.get('speedup', 0):.1f}x, {bench['hardware']}")
        if "compile" in bench:
            print(f"{'':<22} not compiled {medians['eager']:.2f} s/epoch: compiling ({bench['compile']['mode']}) "
                  f"gives {bench['compile']['speedup_over_eager']:.2f}x")
    if (out / "results.md").is_file():
        print((out / "results.md").read_text(encoding="utf-8").split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
