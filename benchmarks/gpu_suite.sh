#!/usr/bin/env bash
# The GPU checks of the memory component (issues 8 and 12), as one script anyone with a CUDA machine runs as is.
#
#   bash benchmarks/gpu_suite.sh                 # tests + bench: the CUDA tests and the memory table (~6-7 min on an H100)
#   bash benchmarks/gpu_suite.sh tests           # pytest -m cuda (~1 min)
#   bash benchmarks/gpu_suite.sh bench           # benchmarks/memory_gpu.py: resident / stream / cpu_offload (~5-6 min)
#   bash benchmarks/gpu_suite.sh all730m         # run.py all on redheart-730m, 8 GiB cap, 0.5 GPU share (~8-9 min)
#   bash benchmarks/gpu_suite.sh mid             # run.py all --seeds 3 on the mid preset, default data (longer)
#   bash benchmarks/gpu_suite.sh prepare         # on a machine WITH the sentence encoder: build the data cache
#                                                # the two `all` parts read (carry $CACHE to an offline GPU box)
#
# Needs the project installed (pip install -e .) with a CUDA build of torch; `bench`'s cpu_offload row needs
# torchao (pip install torchao; without it the row says so).  The `all` parts need Ray and a data cache with the
# VADER encodings ($CACHE, default runs/gpu_suite/cache): an offline GPU machine cannot download VADER or run the
# encoder, so build the cache elsewhere with `prepare` and carry it.  Everything is written under $OUT
# (default runs/gpu_suite): logs, JSON, the runs.
set -euo pipefail
cd "$(dirname "$0")/.."
parts=${1:-tests+bench}
OUT=${OUT:-runs/gpu_suite}
CACHE=${CACHE:-runs/gpu_suite/cache}
PY=${PYTHON:-python}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"

# The 730M `all` run: a few hundred VADER sentences, a 3-epoch sweep over two LRs (the rule needs 3 epochs),
# 4 training epochs, under the spec's 8 GiB budget with a 0.5 GPU share per trial.
ALL730M=(configs/redheart-730m.yaml data.source=vader data.path=null data.max_samples=384 data.max_tokens=64
  data.holdout_max_samples=1000
  "data.cache_dir=$CACHE" "sweep.lrs=[1.0e-4,5.0e-4]" sweep.epochs=3 train.epochs=4 resources.gpu=0.5
  resources.cpus_per_trial=4 memory.gpu_budget_gb=8 "run.output_root=$OUT/runs" run.name=gpu730m)
MID=(configs/default.yaml model.preset=mid optim.batch_size=16 optim.grad_accum=4 resources.gpu=0.5
  "data.cache_dir=$CACHE" "run.output_root=$OUT/runs" run.name=mid)

has() { [[ "+$parts+" == *"+$1+"* ]]; }

$PY - <<'EOF' | tee "$OUT/device.txt"
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}, {p.total_memory / 2**30:.1f} GiB, bf16 native: {torch.cuda.is_bf16_supported(including_emulation=False)}")
else:
    print("no CUDA device: the cuda tests skip and the benchmark runs its CPU path")
EOF

if has prepare; then
  $PY - "${ALL730M[@]}" <<'EOF'
import sys
from redheart_tune.config import cache_dir, load_config
from redheart_tune.data import prepare_data, prepare_holdout
cfg = load_config(sys.argv[1], sys.argv[2:])
print(prepare_data(cfg.data, cache_dir(cfg), show_progress=True).summary())
prepare_holdout(cfg.data, cache_dir(cfg), show_progress=True)  # the held-out set the report scores
EOF
  $PY - "${MID[@]}" <<'EOF'
import sys
from redheart_tune.config import cache_dir, load_config
from redheart_tune.data import prepare_data, prepare_holdout
cfg = load_config(sys.argv[1], sys.argv[2:])
print(prepare_data(cfg.data, cache_dir(cfg), show_progress=True).summary())
prepare_holdout(cfg.data, cache_dir(cfg), show_progress=True)  # the held-out set the report scores
EOF
fi

if has tests; then
  $PY -m pytest -m cuda tests/test_memory_cuda.py -q -rA -s 2>&1 | tee "$OUT/pytest_cuda.log"
fi

if has bench; then
  $PY -m benchmarks.memory_gpu --json "$OUT/memory_gpu.json" 2>&1 | tee "$OUT/memory_gpu.log"
fi

if has all730m; then
  $PY -c "import ray.tune" || { echo "the all730m part needs Ray (pip install 'ray[tune]')"; exit 1; }
  time $PY run.py all "${ALL730M[@]}" 2>&1 | tee "$OUT/all730m.log"
  $PY - "$OUT/runs/gpu730m" <<'EOF' | tee "$OUT/all730m_memory.txt"
import json, sys
from pathlib import Path
for ckpt in sorted(Path(sys.argv[1]).rglob("checkpoint_*/metrics.json")):
    m = json.loads(ckpt.read_text())
    mem = m.get("memory", {})
    peaks = [t["peak_bytes"] for t in mem.get("trace", [])]
    print(f"{ckpt.parent.name}: epoch {m['epoch']}, epoch time {m['epoch_time_s']:.1f} s, peak reserved "
          f"{m.get('peak_reserved_mb', float('nan')):.0f} MiB, peak turn use {max(peaks, default=0) / 2**30:.2f} GiB "
          f"of {mem.get('budget_bytes', 0) / 2**30:.2f} GiB, streamed {mem.get('streamed')}, "
          f"moved {sum(x['bytes'] for x in mem.get('moves', [])) / 2**30:.1f} GiB, retries {m.get('alloc_retries')}")
EOF
fi

if has mid; then
  $PY -c "import ray.tune" || { echo "the mid part needs Ray (pip install 'ray[tune]')"; exit 1; }
  $PY run.py all "${MID[@]}" --seeds 3 2>&1 | tee "$OUT/mid.log"
fi
echo "gpu_suite: done ($parts); logs under $OUT"
