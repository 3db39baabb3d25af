#!/bin/bash
# One call of a lent GPU machine: the timed steps of benchmarks/gpu_checks.py alone on the GPU, then the long
# accuracy runs side by side, each a copy of gpu_checks.py with its own seed. These models are bound by kernel
# launches, so one run leaves the GPU mostly idle: on an H200 three cnn-best runs at once took 4.4 s per epoch
# each against 2.9 s for one alone (docs/results.md, "Second call"). Times of shared runs are not speed results;
# the timed steps run before them, alone.
#
# Copy the KMNIST files into the ignored .data/ (mkdir -p .data && cp -r ../shared/data/kmnist .data/), then run
# `bash benchmarks/gpu_session.sh` with .data carried, and a time limit a minute over END. Everything lands in
# OUT/gpu_session.tgz (the device tool brings back at most 8 files); the summaries are printed at the end, and the
# exit status is 1 if any step failed or was cut off at the deadline.
#
# Settings (environment variables):
#   END             seconds from the start by which every run has written out what it has (default 540)
#   TIMED           step groups run alone, first (default: the report model's bench as one CUDA graph,
#                   with and without torch.compile inside it, and the 10-second recipe)
#   TIMED_SEED      their first seed (default 3: the 10-second recipe on seeds it was not set on)
#   TIMED_DEADLINE  seconds they may take (default 180)
#   SHARED          the side-by-side runs, space-separated GROUPS@SEED (default below)
#                   (TIMED or SHARED set empty: none of those)
#   EXTRA           more gpu_checks.py options for every copy (e.g. "--device cpu --smoke" to try this on a CPU)
#   PYTHON          the Python with torch (default python3; e.g. .venv/bin/python on a CPU)
#   OUT             where the archive goes (set by the device tool)
set -u
cd "$(dirname "$0")/.." || exit 2
END=${END:-540}
TIMED=${TIMED-bench-report-final-graph,bench-report-final-graph-compiled,fast-graph-10s}
TIMED_SEED=${TIMED_SEED:-3}
TIMED_DEADLINE=${TIMED_DEADLINE:-180}
SHARED=${SHARED-mixer-pyramid@1 mixer-pyramid-long@0 mixer-wide-overlap@0 cnn-best-long@0 fast-compiled@0}
EXTRA=${EXTRA:-}
PYTHON=${PYTHON:-python3}
if [ -z "${OUT:-}" ]; then echo "gpu_session.sh: set OUT to the folder for gpu_session.tgz" >&2; exit 2; fi
for job in $SHARED; do
  if ! [[ $job =~ ^[a-z0-9,-]+@[0-9]+$ ]]; then
    echo "gpu_session.sh: SHARED takes GROUPS@SEED entries (e.g. cnn-best@0 mixer-wide,mixer-overlap@1), not '$job'" >&2
    exit 2
  fi
done
if ! [ -f .data/kmnist/kmnist-train-imgs.npz ] && ! [ -f .data/kmnist/train-images-idx3-ubyte.gz ]; then
  echo "gpu_session.sh: no KMNIST files in .data/kmnist (mkdir -p .data && cp -r ../shared/data/kmnist .data/)" >&2
  exit 2
fi
mkdir -p "$OUT" || exit 2
export PYTHONPATH=src PYTHONUNBUFFERED=1
work=$(mktemp -d /tmp/gpu-session-XXXXXX)
# shellcheck disable=SC2206  # EXTRA is split into options on purpose
checks=("$PYTHON" benchmarks/gpu_checks.py --data-dir .data $EXTRA)
started=$SECONDS
{ date -u; nvidia-smi; nproc; "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  git rev-parse HEAD; git status --short; } > "$work/machine.txt" 2>&1

if [ -n "$TIMED" ]; then
  "${checks[@]}" --steps "$TIMED" --first-seed "$TIMED_SEED" --out "$work/timed" --budget "$TIMED_DEADLINE" \
    --deadline "$TIMED_DEADLINE" > "$work/timed.out" 2>&1
  code=$?
  echo "timed steps: exit $code after $((SECONDS - started)) s" | tee -a "$work/phases.txt"
  failed=$(( code != 0 ))
else
  failed=0
fi

left=$((END - (SECONDS - started)))
threads=$(( $(nproc) / ($(wc -w <<< "$SHARED") + 1) ))
pids=()
for job in $SHARED; do
  groups=${job%@*} seed=${job#*@}
  name=$(tr ',' '+' <<< "$groups")-s$seed
  OMP_NUM_THREADS=$(( threads > 0 ? threads : 1 )) "${checks[@]}" --steps "$groups" --first-seed "$seed" \
    --out "$work/$name" --budget "$left" --deadline "$left" > "$work/$name.out" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do
  wait "$pid" || failed=1  # a step that failed, or a copy stopped at its deadline (exit 3)
done
echo "side-by-side runs done after $((SECONDS - started)) s" | tee -a "$work/phases.txt"

tar czf "$OUT/gpu_session.tgz" -C "$work" .
for out in "$work"/*.out; do
  echo "#### $(basename "$out" .out)"
  if grep -q "== summary" "$out"; then
    grep -h "error:" "$out" | sort -u | head -5  # a step's one-line reason, where one failed
    sed -n '/== summary/,$p' "$out" | head -40
  else
    tail -n 3 "$out"  # stopped before any step ran (bad option, no torch): its last words
  fi
done
rm -rf "$work"
exit "$failed"
