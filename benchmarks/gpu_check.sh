#!/usr/bin/env bash
# The GPU check, as one script that runs as is in one call. Parts, in order, each with its own timeout:
#   tests    the CUDA tests (tests/test_memory_cuda.py: stream == resident on the card, the budget held, two
#            processes sharing the card under 0.5 shares, the step without a host wait)        TESTS_S=120
#   bench    benchmarks/memory_gpu.py --quick at the spec's shape (64 rows x 128 tokens per optimizer step, bf16):
#            resident (no cap), stream (8 GiB cap), torchao's CPU offload (8 GiB cap); 75 s a row  BENCH_S=250
#   all      python run.py all on configs/redheart-730m.yaml: 128 VADER sentences, a 3-epoch sweep of two LRs as
#            two trials sharing the card (0.5 each), 4 training epochs, the analysis, under the 8 GiB cap;
#            its epoch times, start-up costs, checkpoint write/hash seconds and results table     ALL_S=330
#   profile  one stream step profiled (top operators by CUDA time), untimed (not in the default PARTS) PROFILE_S=160
#   compile  the stream step eager against optim.compile=true, 4 steps each (not in the default PARTS;
#            the compiled row's first step compiles every unit; each row at most 300 s)          COMPILE_S=480
#   mid      python run.py all configs/default.yaml model.preset=mid --seeds 3: the second model size's three-seed
#            comparison on the default data; hours, so not in the default PARTS: PARTS=mid TOTAL_S=86400; cut
#            short, the same command resumes it. Offline, it reads `gpu_carry.sh mid`'s cache    MID_S=86400
# The whole call ends within TOTAL_S (default 470 s, under 8 minutes): each part gets its own timeout or what is
# left of TOTAL_S, whichever is less, and a part with under 30 s left is skipped and says so. The part timeouts
# add up to 12 minutes, so on a slow card `all` is cut first; a session with more device time runs the parts in
# two calls (PARTS="tests bench", then PARTS=all) or raises TOTAL_S.
# nvidia-smi --query-compute-apps is sampled every 0.5 s throughout: each process's real use, context included.
# $OUT (default runs/gpu_check) receives two files: summary.txt and results.tar.gz (every log, figure, CSV and
# JSON). The rest (logs, the runs, the installed wheels, a DRY data cache) is written under $WORK (default a
# fresh folder in $TMPDIR or /tmp), so a device call whose $OUT brings back a few small files gets them all.
# On a card with 15 minutes of device time, two calls: PARTS="tests bench" TOTAL_S=400, then PARTS=all
# TOTAL_S=480 (tests 120 s and bench 250 s leave `all` too little of one 470 s call to finish).
#
# Ray missing (an offline GPU machine): it is installed from .gpu/ (benchmarks/gpu_carry.sh builds it here,
# with the data cache of the `all` part, which needs the sentence encoder a GPU machine may lack).
#   DRY=1 bash benchmarks/gpu_check.sh    # the same parts on a CPU, tiny preset (what CI runs)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
PY=${PYTHON:-python3}
PARTS=${PARTS:-tests bench all}
CARRY=${CARRY:-.gpu}
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/redheart_gpu_check.XXXXXX")}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
case $CARRY in /*) ;; *) CARRY=$PWD/$CARRY ;; esac  # absolute, whatever it was given as
T0=$SECONDS
TOTAL_S=${TOTAL_S:-470}
log() { echo "[$((SECONDS - T0))s] $*" | tee -a "$OUT/summary.txt"; }
# A part runs when PARTS names it and at least 30 s of TOTAL_S are left after 20 s kept for the archive;
# its timeout is then its own or what is left, whichever is less ($LIMIT).
runs() {
  [[ " $PARTS " == *" $1 "* ]] || return 1
  local left=$((TOTAL_S - (SECONDS - T0) - 20))
  if [ "$left" -lt 30 ]; then
    log "$1: skipped, ${left}s of TOTAL_S=${TOTAL_S}s left"
    return 1
  fi
  LIMIT=$(( $2 < left ? $2 : left ))
  [ "$LIMIT" -lt "$2" ] && log "$1: ${LIMIT}s left of TOTAL_S=${TOTAL_S}s, not its ${2}s"
  return 0
}

TAG=$($PY -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
if ! $PY -c "import ray.tune" 2>/dev/null && [ -f "$CARRY/whl/ray$TAG.tar.xz" ]; then
  SITE=${SITE:-$WORK/site}
  log "installing Ray and the wheels from $CARRY into $SITE"
  mkdir -p "$SITE" && tar -xJf "$CARRY/whl/ray$TAG.tar.xz" -C "$SITE" &&
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$CARRY"/whl/*.whl > "$WORK/setup.log" 2>&1 || { log "setup failed"; tail -5 "$WORK/setup.log"; }
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

$PY - <<'PY' 2>&1 | tee -a "$OUT/summary.txt"
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}, {p.total_memory / 2**30:.1f} GiB")
PY
SMI=""
if [ -z "${DRY:-}" ] && command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-compute-apps=timestamp,pid,used_memory --format=csv -lms 500 > "$WORK/smi_apps.csv" 2>&1 &
  SMI=$!
fi

if [ -n "${DRY:-}" ]; then
  BENCH=(--device cpu --preset tiny --budget-gb 0.03 --tokens 24 --steps 2 --accum 4 --timeout 120)
  PROFILE=(--device cpu --preset tiny --budget-gb 0.03 --tokens 24 --steps 1 --accum 4 --timeout 120)
  COMPILE=(--device cpu --preset tiny --budget-gb 0.03 --tokens 24 --steps 4 --accum 4 --timeout 300)
  ALL=(model.preset=tiny resources.gpu=0 resources.cpus_per_trial=1 resources.ray_num_cpus=2 optim.grad_accum=2
    "data.cache_dir=${CACHE:-$WORK/cache}")
  MID=(configs/smoke.yaml sweep.epochs=3 train.epochs=2 resources.gpu=0 resources.ray_num_cpus=2
    "data.cache_dir=${CACHE:-$WORK/cache}")
else
  BENCH=(--quick --accum 16 --batch 4 --tokens 128)
  PROFILE=(--steps 2 --accum 16 --batch 4 --tokens 128 --timeout 150)
  COMPILE=(--steps 4 --accum 16 --batch 4 --tokens 128 --timeout 300)
  ALL=(resources.gpu=0.5 resources.cpus_per_trial=4 memory.gpu_budget_gb=8 "data.cache_dir=${CACHE:-$CARRY/cache}")
  MID=(configs/default.yaml model.preset=mid optim.batch_size=16 optim.grad_accum=4 resources.gpu=0.5
    resources.cpus_per_trial=4 "data.cache_dir=${CACHE:-$CARRY/cache}")
fi
# The `all` part's data: benchmarks/gpu_carry.sh builds its cache with these same settings.
ALL_DATA=(data.source=vader data.path=null data.max_samples=128 data.max_tokens=64 data.holdout_max_samples=200)

if runs tests ${TESTS_S:-120}; then
  log "cuda tests"
  if [ -n "${DRY:-}" ]; then
    log "cuda tests: skipped (DRY: no CUDA device)"
  else
    timeout -k 5 $LIMIT $PY -m pytest -m cuda tests/test_memory_cuda.py -v -rA --durations=0 -p no:cacheprovider \
      > "$WORK/pytest_cuda.log" 2>&1
    log "cuda tests rc=$?"
    tail -8 "$WORK/pytest_cuda.log" | tee -a "$OUT/summary.txt"
  fi
fi

if runs bench ${BENCH_S:-250}; then
  log "bench: resident, stream, cpu_offload"
  timeout -k 5 $LIMIT $PY -m benchmarks.memory_gpu "${BENCH[@]}" --json "$WORK/bench.json" \
    > "$WORK/bench.log" 2>&1
  log "bench rc=$?"
  grep -v '^\[' "$WORK/bench.log" | tail -8 | tee -a "$OUT/summary.txt"
fi

if runs all ${ALL_S:-330}; then
  RUNS="$WORK/runs"
  log "all: redheart-730m config, two sweep trials sharing the card, 4 training epochs, the analysis"
  timeout -k 10 $LIMIT $PY run.py all configs/redheart-730m.yaml "${ALL_DATA[@]}" "${ALL[@]}" \
    "sweep.lrs=[1.0e-4,5.0e-4]" sweep.epochs=3 sweep.max_concurrent=2 train.epochs=4 train.progress_every_s=0 \
    "run.output_root=$RUNS" run.name=gpu730m > "$WORK/all.log" 2>&1
  log "all rc=$?"
  grep -E "start-up cost|checkpoint [0-9]+: wrote|Error|error:" "$WORK/all.log" | tail -12 | tee -a "$OUT/summary.txt"
  $PY - "$RUNS/gpu730m" <<'PY' 2>&1 | tee -a "$OUT/summary.txt"
import json, sys
from pathlib import Path
root = Path(sys.argv[1])
for result in sorted(root.glob("*/*/result.json")):  # sweep and train trials: one JSON line per epoch
    for line in result.read_text().splitlines():
        r = json.loads(line)
        print(f"{result.parent.parent.name}/{result.parent.name[:24]}: epoch {r.get('epoch')} "
              f"{r.get('epoch_time_s', float('nan')):.1f} s, val_loss {r.get('val_loss', float('nan')):.4f}, "
              f"peak reserved {r.get('peak_reserved_mb')} MB, startup {r.get('startup_s', '')}")
for table in sorted(root.rglob("results.csv"))[:1]:
    print(f"{table.relative_to(root)}:\n{table.read_text()}")
PY
fi

if runs profile ${PROFILE_S:-160}; then
  log "profile: one untimed stream step after two timed ones"
  timeout -k 5 $LIMIT $PY -m benchmarks.memory_gpu "${PROFILE[@]}" --rows stream --profile "$WORK/profile" \
    > "$WORK/profile.log" 2>&1
  log "profile rc=$?"
fi

if runs compile ${COMPILE_S:-480}; then
  log "compile: the stream step eager and compiled"
  timeout -k 5 $LIMIT $PY -m benchmarks.memory_gpu "${COMPILE[@]}" --rows stream,stream_compiled \
    --json "$WORK/compile.json" > "$WORK/compile.log" 2>&1
  log "compile rc=$?"
  grep -v '^\[' "$WORK/compile.log" | tail -5 | tee -a "$OUT/summary.txt"
fi

if runs mid ${MID_S:-86400}; then
  log "mid: run.py all --seeds 3 on the mid preset (a second model size), default data"
  timeout -k 10 $LIMIT $PY run.py all "${MID[@]}" "run.output_root=$WORK/runs" run.name=mid --seeds 3 \
    > "$WORK/mid.log" 2>&1
  log "mid rc=$?"
  grep -E "Error|error:" "$WORK/mid.log" | tail -5 | tee -a "$OUT/summary.txt"
  table="$WORK/runs/mid/analysis/seeds/intervals_summary.csv"  # every method over the three seeds
  [ -f "$table" ] && tee -a "$OUT/summary.txt" < "$table"
fi

[ -n "$SMI" ] && kill "$SMI" 2>/dev/null
if [ -f "$WORK/smi_apps.csv" ]; then
  $PY - "$WORK/smi_apps.csv" <<'PY' | tee -a "$OUT/summary.txt"
import collections, sys
peak = collections.Counter()
for line in open(sys.argv[1]).read().splitlines()[1:]:
    parts = [p.strip() for p in line.split(",")]
    if len(parts) >= 3 and parts[2].endswith("MiB"):
        peak[parts[1]] = max(peak[parts[1]], int(parts[2].split()[0]))
for pid, mib in peak.items():
    print(f"nvidia-smi peak of pid {pid}: {mib} MiB")
PY
fi
# The logs, figures, CSVs and JSON in one archive beside the summary (a device call brings back a few files only).
log "done: $OUT/summary.txt, $OUT/results.tar.gz (the rest under $WORK)"
cp "$OUT/summary.txt" "$WORK/summary.txt"
(cd "$WORK" && find . \( -path ./cache -o -path ./site -o -name "checkpoint_*" \) -prune -o \
  \( -name "*.log" -o -name "*.csv" -o -name "*.png" -o -name "*.json" -o -name "*.txt" \) -print 2>/dev/null |
  tar -czf "$OUT/results.tar.gz" -T - 2>/dev/null)
