#!/bin/bash
# This session's GPU call: the timed steps alone on the GPU, then the accuracy runs side by side.
# usage: OUT=... END=... bash .data/run.sh [extra gpu_checks.py options]
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
END=${END:-555}
W=/tmp/gc; rm -rf "$W"; mkdir -p "$W"
GC=(python3 benchmarks/gpu_checks.py --data-dir .data "$@")
T0=$SECONDS
{ date -u; nvidia-smi; nproc; python3 -c 'import torch; print(torch.__version__, torch.version.cuda)'; } > "$W/machine.txt" 2>&1
"${GC[@]}" --steps bench-report-final-graph,fast-graph-large-batch --out "$W/p1" --budget 150 --deadline 220 > "$W/p1.out" 2>&1
echo "phase 1 rc $? after $((SECONDS - T0)) s" | tee -a "$W/phases.txt"
left=$((END - (SECONDS - T0)))
for s in 0 1 2; do
  OMP_NUM_THREADS=3 "${GC[@]}" --steps cnn-best --first-seed $s --out "$W/cnn-best-s$s" --budget 60 --deadline $left > "$W/cnn-best-s$s.out" 2>&1 &
done
OMP_NUM_THREADS=3 "${GC[@]}" --steps mixer-overlap,mixer-wide --first-seed 1 --out "$W/mixer" --budget $((left - 200)) --deadline $left > "$W/mixer.out" 2>&1 &
wait
echo "phase 2 done after $((SECONDS - T0)) s" | tee -a "$W/phases.txt"
tar czf "$OUT/gpu_checks.tgz" -C "$W" .
cat "$W/machine.txt" | head -20
for f in "$W"/*.out; do echo "#### $f"; sed -n '/== summary/,$p' "$f" | head -30; done
