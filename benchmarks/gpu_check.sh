#!/usr/bin/env bash
# The GPU check of the training step, as one script that runs as is in one call (about 6 minutes on an H200):
#   1. benchmarks/memory_gpu.py --quick at the spec's shape (64 rows x 128 tokens per optimizer step, bf16):
#      resident (no cap), stream (8 GiB cap), torchao's CPU offload (8 GiB cap); then one stream step profiled
#      (top operators by CUDA time), untimed;
#   2. the CUDA tests (tests/test_memory_cuda.py, two processes sharing the card among them);
#   nvidia-smi --query-compute-apps sampled every 0.5 s throughout: each process's real use, context included.
# Each part has its own timeout; everything goes to $OUT (default runs/gpu_check).
#   DRY=1 bash benchmarks/gpu_check.sh    # the same parts on a CPU, tiny preset (what CI runs)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
T0=$SECONDS
log() { echo "[$((SECONDS - T0))s] $*" | tee -a "$OUT/summary.txt"; }

$PY - <<'PY' 2>&1 | tee -a "$OUT/summary.txt"
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}, {p.total_memory / 2**30:.1f} GiB")
PY
SMI=""
if [ -z "${DRY:-}" ] && command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-compute-apps=timestamp,pid,used_memory --format=csv -lms 500 > "$OUT/smi_apps.csv" 2>&1 &
  SMI=$!
fi

if [ -n "${DRY:-}" ]; then
  BENCH=(--device cpu --preset tiny --budget-gb 0.03 --tokens 24 --steps 2 --accum 4 --timeout 120)
  PROFILE=(--device cpu --preset tiny --budget-gb 0.03 --tokens 24 --steps 1 --accum 4 --timeout 120)
else
  BENCH=(--quick --accum 16 --batch 4 --tokens 128)
  PROFILE=(--steps 2 --accum 16 --batch 4 --tokens 128 --timeout 150)
fi
log "bench: resident, stream, cpu_offload"
timeout -k 5 ${BENCH_S:-300} $PY -m benchmarks.memory_gpu "${BENCH[@]}" --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
log "bench rc=$?"
grep -v '^\[' "$OUT/bench.log" | tail -8 | tee -a "$OUT/summary.txt"
log "profile: one untimed stream step after two timed ones"
timeout -k 5 ${PROFILE_S:-160} $PY -m benchmarks.memory_gpu "${PROFILE[@]}" --rows stream --profile "$OUT/profile" \
  > "$OUT/profile.log" 2>&1
log "profile rc=$?"

log "cuda tests"
timeout -k 5 ${TESTS_S:-120} $PY -m pytest -m cuda tests/test_memory_cuda.py -q -rA -p no:cacheprovider \
  > "$OUT/pytest_cuda.log" 2>&1
log "cuda tests rc=$?"
tail -8 "$OUT/pytest_cuda.log" | tee -a "$OUT/summary.txt"

[ -n "$SMI" ] && kill "$SMI" 2>/dev/null
if [ -f "$OUT/smi_apps.csv" ]; then
  $PY - "$OUT/smi_apps.csv" <<'PY' | tee -a "$OUT/summary.txt"
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
log "done"
