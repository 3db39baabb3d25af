"""The GPU checks of the speed and accuracy work, in one call of a lent GPU machine.

Prepared on CPU-only machines and checked there with --smoke; the GPU numbers come from running
it where a GPU is lent (no step starts after --budget seconds, and the JSON is rewritten after each
step, so a cut-off call keeps what finished). Step groups (--steps, in the order given):

  bench-report-final[-compiled|-graph|-graph-compiled]
                                 `kmnist bench` of the report's model on CUDA: our loop against the
                                 per-sample DataLoader pipeline of the same model, side by side
                                 (target: >= 20x), epochs timed on their first 100 batches; compiled
                                 with CUDA graphs of the model (`--compile reduce-overhead`), the
                                 whole step captured as one CUDA graph (`--compile cuda-graph`:
                                 15.2x on an H200), or that graph around the model compiled by
                                 torch.compile, fewer and fused kernels (`cuda-graph-compiled`),
                                 each beside eager;
  bench-cnn-fast-cpu[-graph]     the same for `cnn-fast-cpu` (compiled, or as one graph);
  fast-compiled, fast-eager      `--preset cnn-fast-cpu` on CUDA, seeds 0-2, compiled or not: training
                                 time and test accuracy of a fixed recipe (target: >= 99.0% mean in
                                 <= 10 s of training; compiling is timed apart);
  fast-*-all-data                the same on all 60,000 training images (`--val-size 0`);
  fast-[graph-]large-batch       the same, compiled (or as one graph), on all 60,000 images, at
                                 batch 1024 (lr scaled up): a quarter of the steps, so a quarter of
                                 the launches of a launch-bound loop (its accuracy at batch 1024 was
                                 checked on a CPU at width 8 only: docs/benchmarks.md);
  fast-graph-10s                 fast-graph-large-batch for 30 epochs: the recipe that gave 99.09% in
                                 8.3 s on an H200 (seeds 0-2; its length was set after the 20-epoch
                                 test mean was seen, so other seeds, --first-seed 3, confirm it);
  fast-graph-compiled-10s        the same with `--compile cuda-graph-compiled`;
  cnn-best                       `--preset cnn-best`, seed --first-seed (0): the GPU-sized single model
                                 (target: >= 99.4%);
  cnn-best-long                  the same for 100 epochs instead of 60 (its test accuracy was still
                                 rising at epoch 60 on an H200);
  mixer-wide, mixer-overlap      `--preset mixer-flat` (the one-stage Mixer; `mixer-best` until 2026-12-01),
                                 seed --first-seed (0), with what 2 CPU cores could not afford (target:
                                 >= 98.0% with no convolution): twice its width and depth and 60 epochs with
                                 4x4 patches every 4 pixels (96.4% at the usual size), or at the usual size
                                 with overlapping patches (4x4 every 2 pixels, 169 tokens, so that a 2-pixel
                                 shift of the character moves it onto other patches; the preset itself,
                                 96.9%);
  mixer-wide-overlap             both at once;
  mixer-pyramid                  `--preset mixer-best`: the all-MLP model in two stages (14x14 tokens,
                                 then 2x2 of them merged: 7x7), the best all-MLP model on validation on 2
                                 CPU cores (docs/results.md);
  mixer-pyramid-long             the same for 60 epochs instead of 36.

No step starts after --budget seconds; at --deadline seconds (set it inside the call's time limit)
whatever has finished, and the epochs so far of the step in progress, are written out and the
script exits, so a step that runs long costs its own result only.

The KMNIST files must travel with the working tree: copy them into the ignored folder .data/
(`mkdir -p .data && cp -r ../shared/data/kmnist .data/`), name `.data` in the call's carry, and run

    PYTHONPATH=src python3 benchmarks/gpu_checks.py --data-dir .data --out $OUT

benchmarks/gpu_session.sh runs several copies of this script in one call: the timed steps alone, then
the long accuracy runs side by side, each with its own --first-seed.

Everything lands in OUT/gpu_checks.json (each step's command, exit code, seconds and results),
OUT/gpu_checks.log, the bench JSON files, and the `kmnist report` of the runs (OUT/results.md,
OUT/report.html; each other kind of run in OUT/results-<kind>.md, e.g. results-compiled.md or
results-graph-all-data-large-batch.md) and each run's config, summary, metrics and environment in
OUT/runs/<run>/. Runs train in a scratch folder, removed at the end, as checkpoints need not come back.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

from kmnist.cli import main as kmnist

# --smoke: the same steps on a CPU in a few minutes, to check this script before a GPU is lent.
SMOKE_BENCH = ["--max-batches", "3", "--repeats", "1"]
SMOKE_TRAIN = ["--epochs", "1", "--model-arg", "width=8"]
SMOKE_MIXER = ["--epochs", "1", "--model-arg", "dim=16", "--model-arg", "depth=1"]
# In order of what the issues need most; later steps are the first to go when time runs short. Run on an H200
# (docs/benchmarks.md, docs/results.md): on 2026-11-29 the eager steps, cnn-best and the benches; on 2026-11-30 the
# whole step as one CUDA graph (15.2x; 99.09% in 8.3 s at 30 epochs), cnn-best with --ema's averaged BatchNorm
# statistics, mixer-overlap, and mixer-wide until a deadline cut it off. Next: the 10-second recipe on other seeds,
# the wide Mixer to its end and with overlapping patches, cnn-best for longer; since 2026-12-01 first the two-stage
# all-MLP model (mixer-pyramid, the best all-MLP model on 2 CPU cores: docs/results.md) on another seed, and for
# longer. benchmarks/gpu_session.sh runs the timed steps alone and the long accuracy runs side by side, which fits
# far more into one call.
DEFAULT_STEPS = ("bench-report-final-graph,bench-report-final-graph-compiled,fast-graph-10s,mixer-pyramid,"
                 "mixer-wide-overlap,cnn-best-long,mixer-pyramid-long,fast-compiled,"
                 "bench-cnn-fast-cpu-graph")
COMPILE = "reduce-overhead"  # torch.compile with CUDA graphs: launch overhead is what bounds small models on a GPU
# Four times cnn-fast-cpu's batch of 256, with twice its peak lr of 0.2: at width 8 on a CPU (seed 0, 20 epochs) lr 0.4
# and 0.8 tied on best validation accuracy (99.34 / 99.36%) and 0.4 ended higher (99.32 / 99.28%), which is what a
# --val-size 0 run ends with (docs/benchmarks.md).
LARGE_BATCH = ["--batch-size", "1024", "--lr", "0.4"]
# mixer-flat (dim 128, depth 4, 36 epochs; mixer-best until 2026-12-01) was still gaining validation accuracy at
# its end on the CPU.
MIXER_WIDE = ["--model-arg", "dim=256", "--model-arg", "depth=8", "--model-arg", "token_hidden=256",
              "--model-arg", "channel_hidden=512", "--epochs", "60"]
# Patches every 4 or every 2 pixels, named even where it is the preset's own stride (mixer-flat's is 2).
MIXER_NO_OVERLAP = ["--model-arg", "stride=4"]
MIXER_OVERLAP = ["--model-arg", "stride=2"]
PRESETS = ("cnn-fast-cpu", "cnn-best", "mixer-best", "mixer-flat")  # run folders are named <preset><kind>-s<seed>
RUN_FILES = ("config.json", "summary.json", "metrics.csv", "environment.json")  # what comes back of each run


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
    # The GPU machine has no kana font (matplotlib-fontja): figures label classes in the fallback font.
    warnings.filterwarnings("ignore", message="Glyph .* missing from font")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=".data", help="folder holding kmnist/ (default .data)")
    parser.add_argument("--out", required=True, help="folder for gpu_checks.json and gpu_checks.log")
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu with --smoke")
    parser.add_argument("--budget", type=float, default=420, help="seconds after which no new step starts")
    parser.add_argument("--deadline", type=float, default=540,
                        help="seconds after which the results so far are written out and the script exits")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the fixed fast recipe (default 3)")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="the first seed (default 0): the fast recipe trains seeds first-seed .. first-seed + "
                             "seeds - 1, cnn-best and the Mixers the first only; several copies of this script with "
                             "other first seeds can share one GPU")
    parser.add_argument("--steps", default=DEFAULT_STEPS,
                        help=f"comma-separated step groups, in order (default {DEFAULT_STEPS})")
    parser.add_argument("--smoke", action="store_true", help="tiny steps, to check the script on a CPU")
    args = parser.parse_args()
    if args.seeds < 1 or args.first_seed < 0 or args.budget <= 0 or args.deadline <= 0:
        parser.error("--seeds must be at least 1, --first-seed at least 0, --budget and --deadline positive")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; check the script on a CPU with --device cpu --smoke")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="kmnist-gpu-"))
    common = ["--data-dir", args.data_dir, "--device", args.device, "--no-progress"]
    bench_extra = SMOKE_BENCH if args.smoke else ["--repeats", "3", "--max-batches", "100"]
    train_extra = SMOKE_TRAIN if args.smoke else []
    mixer_extra = SMOKE_MIXER if args.smoke else []

    # How a step trains: eager, torch.compile with CUDA graphs of the model, or the whole step as one CUDA graph.
    modes = {"eager": ([], ""), "compiled": (["--compile", COMPILE], "-compiled"),
             "graph": (["--compile", "cuda-graph"], "-graph"),
             "graph-compiled": (["--compile", "cuda-graph-compiled"], "-graph-compiled")}

    def fast(seed: int, mode: str, all_data: bool = False, large_batch: bool = False,
             epochs: int | None = None) -> tuple[str, list[str]]:
        flags, tag = modes[mode]
        tag += ("-all-data" if all_data else "") + ("-large-batch" if large_batch else "")
        tag += f"-e{epochs}" if epochs else ""
        return f"cnn-fast-cpu{tag.replace('-', ' ')} seed {seed}", [
            "train", "--preset", "cnn-fast-cpu", "--seed", str(seed), *flags,
            *(["--val-size", "0"] if all_data else []), *(LARGE_BATCH if large_batch else []),
            *(["--epochs", str(epochs)] if epochs else []), *common, *train_extra,
            "--out", str(scratch / f"cnn-fast-cpu{tag}-s{seed}")]

    def bench(preset: str, mode: str) -> tuple[str, list[str]]:
        flags, tag = modes[mode]
        name = f"bench-{preset}{tag}"
        return name.replace("-", " ", 1), ["bench", "--preset", preset, *common, *bench_extra, *flags,
                                           "--json", str(out / f"{name}.json")]

    first = args.first_seed

    def mixer(preset: str, tag: str, flags: list[str]) -> tuple[str, list[str]]:
        return f"{preset}{tag.replace('-', ' ')} seed {first}", [
            "train", "--preset", preset, "--seed", str(first), *flags, *common, *mixer_extra,
            "--out", str(scratch / f"{preset}{tag}-s{first}")]

    seeds = range(first, first + args.seeds)
    groups: dict[str, list[tuple[str, list[str]]]] = {
        "bench-report-final": [bench("report-final", "eager")],
        "bench-report-final-compiled": [bench("report-final", "compiled")],
        "bench-report-final-graph": [bench("report-final", "graph")],
        "bench-report-final-graph-compiled": [bench("report-final", "graph-compiled")],
        "bench-cnn-fast-cpu": [bench("cnn-fast-cpu", "compiled")],
        "bench-cnn-fast-cpu-graph": [bench("cnn-fast-cpu", "graph")],
        "fast-compiled": [fast(seed, "compiled") for seed in seeds],
        # The fixed recipe on all 60,000 training images: nothing is chosen, the last epoch is the result.
        "fast-compiled-all-data": [fast(seed, "compiled", all_data=True) for seed in seeds],
        "fast-large-batch": [fast(seed, "compiled", all_data=True, large_batch=True) for seed in seeds],
        "fast-graph-large-batch": [fast(seed, "graph", all_data=True, large_batch=True) for seed in seeds],
        "fast-graph-10s": [fast(seed, "graph", all_data=True, large_batch=True, epochs=30) for seed in seeds],
        "fast-graph-compiled-10s": [fast(seed, "graph-compiled", all_data=True, large_batch=True, epochs=30)
                                    for seed in seeds],
        "fast-eager": [fast(seed, "eager") for seed in seeds],
        "fast-eager-all-data": [fast(seed, "eager", all_data=True) for seed in seeds],
        "cnn-best": [(f"cnn-best seed {first}", ["train", "--preset", "cnn-best", "--seed", str(first), *common,
                                                 *train_extra, "--out", str(scratch / f"cnn-best-s{first}")])],
        "cnn-best-long": [(f"cnn-best long seed {first}", [
            "train", "--preset", "cnn-best", "--seed", str(first), "--epochs", "100",
            *common, *train_extra, "--out", str(scratch / f"cnn-best-long-s{first}")])],
        "mixer-wide": [mixer("mixer-flat", "-wide", MIXER_WIDE + MIXER_NO_OVERLAP)],
        "mixer-overlap": [mixer("mixer-flat", "-overlap", MIXER_OVERLAP)],
        "mixer-wide-overlap": [mixer("mixer-flat", "-wide-overlap", MIXER_WIDE + MIXER_OVERLAP)],
        "mixer-pyramid": [mixer("mixer-best", "", [])],
        "mixer-pyramid-long": [mixer("mixer-best", "-long", ["--epochs", "60"])],
    }
    unknown = [name for name in args.steps.split(",") if name not in groups]
    if unknown:
        parser.error(f"unknown step group(s) {', '.join(unknown)}; known: {', '.join(groups)}")
    steps = [step for name in args.steps.split(",") for step in groups[name]]
    report: dict = {"smoke": args.smoke, "machine": machine(args.device), "steps": {}}
    lock = threading.Lock()
    started = time.perf_counter()
    log = open(out / "gpu_checks.log", "w", encoding="utf-8")

    def save() -> None:
        (out / "gpu_checks.json").write_text(json.dumps(report, indent=2))

    def finish() -> None:
        """The project's tables of the finished runs, the files that come back, and the summary on screen."""
        finished = [Path(step["command"][-1]) for step in report["steps"].values() if "summary" in step]
        # One table per kind of run (the tag in its folder's name): `kmnist report` would count compiled runs
        # as repeats of eager ones.
        kinds: dict[str, list[Path]] = {}
        for run_dir in finished:
            name = run_dir.name.rsplit("-s", 1)[0]
            tag = next(name.removeprefix(preset) for preset in PRESETS if name.startswith(preset))
            kinds.setdefault(tag, []).append(run_dir)
        for suffix, run_dirs in kinds.items():
            if run_dirs:
                report["steps"]["report" + suffix] = run_step(
                    "report" + suffix, ["report", *map(str, run_dirs), "--out", str(scratch / f"report{suffix}")], log)
                save()
            for name in ("results.md", "report.html") if suffix == "" else ("results.md",):
                if (scratch / f"report{suffix}" / name).is_file():
                    shutil.copy(scratch / f"report{suffix}" / name, out / name.replace(".", f"{suffix}.", 1))
        keep_run_files()
        print_table(report, out)
        log.flush()

    def keep_run_files() -> None:
        """Each run's small files to OUT/runs/<run>/; the scratch folder, checkpoints and all, is removed."""
        for run_dir in sorted(config.parent for config in scratch.glob("*/config.json")):
            for name in RUN_FILES:
                if (run_dir / name).is_file():
                    (out / "runs" / run_dir.name).mkdir(parents=True, exist_ok=True)
                    shutil.copy(run_dir / name, out / "runs" / run_dir.name / name)
        shutil.rmtree(scratch, ignore_errors=True)

    def at_deadline() -> None:
        with lock:  # the main thread is inside a step: keep its epochs so far, then stop everything
            if current:
                name, step_args = current
                report["steps"][name] = {"command": ["kmnist", *step_args], "cut_off_at_deadline": True,
                                         "epochs": epochs_of(step_args)}
            report["deadline_reached_after_seconds"] = time.perf_counter() - started
            save()
            print(f"\n== deadline of {args.deadline:.0f} s reached: results so far written", flush=True)
            finish()
            sys.stdout.flush()
            os._exit(3)

    current: tuple[str, list[str]] | None = None
    watchdog = threading.Timer(args.deadline, at_deadline)
    watchdog.daemon = True
    watchdog.start()
    failed_modes: set[str] = set()  # --compile modes whose training failed: their later runs are skipped
    for name, step_args in steps:
        mode = step_args[step_args.index("--compile") + 1] if "--compile" in step_args else None
        if time.perf_counter() - started > args.budget:
            report["steps"][name] = {"skipped": f"budget of {args.budget:.0f} s spent"}
            continue
        if mode in failed_modes and step_args[0] == "train":
            report["steps"][name] = {"skipped": f"an earlier training run with --compile {mode} failed"}
            continue
        current = (name, step_args)
        result = run_step(name, step_args, log)
        with lock:
            current = None
            if step_args[0] == "train":
                run_dir = Path(step_args[-1])
                for file in ("summary.json", "environment.json"):
                    if (run_dir / file).is_file():
                        result[file.removesuffix(".json")] = json.loads((run_dir / file).read_text())
                result["epochs"] = epochs_of(step_args)
                if result["exit_code"] and mode:
                    failed_modes.add(mode)
            report["steps"][name] = result
            save()
    with lock:
        watchdog.cancel()
        finish()
    return 1 if any(step.get("exit_code") for step in report["steps"].values()) else 0


def epochs_of(step_args: list[str]) -> list[dict]:
    """The per-epoch rows a training step has written so far (its metrics.csv), as numbers."""
    metrics = Path(step_args[-1]) / "metrics.csv"
    if not metrics.is_file():
        return []
    with open(metrics, newline="", encoding="utf-8") as handle:
        return [{key: float(value) for key, value in row.items() if value not in ("", None)}
                for row in csv.DictReader(handle)]


def machine(device: str) -> dict:
    """What the checks ran on: torch and CUDA versions, the GPU, and nvidia-smi's view of it."""
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": device}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        try:
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                 "--format=csv"], capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError) as error:
            info["nvidia_smi"] = f"not available: {error}"
    return info


def print_table(report: dict, out: Path) -> None:
    print(f"\n== summary (full results: {out / 'gpu_checks.json'})")
    for name, step in report["steps"].items():
        if "skipped" in step:
            print(f"{name:<22} skipped: {step['skipped']}")
            continue
        if step.get("cut_off_at_deadline"):
            epochs = step["epochs"]
            pace = f", {statistics.median(row['epoch_seconds'] for row in epochs):.2f} s per epoch" if epochs else ""
            print(f"{name:<22} cut off at the deadline after {len(epochs)} epochs{pace}")
            continue
        line = f"{name:<22} exit {step['exit_code']}, {step['seconds']:.0f} s"
        summary = step.get("summary")
        if summary:
            honest = summary["test_acc_at_best_val"]
            line += (f"; training {summary['train_seconds']:.1f} s"
                     + (f", test at best val {honest:.2f}%" if honest is not None else ", no validation split")
                     + f", final epoch {summary['final_test_acc']:.2f}%")
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
