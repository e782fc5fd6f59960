#!/usr/bin/env bash
# Build, on a CPU machine with the project installed, what an offline GPU machine needs for benchmarks/gpu_check.sh
# when it has CUDA torch, pandas, pyarrow and pytest but no Ray, no pydantic and no sentence-encoder weights,
# into one folder (default .gpu/, about 45 MB; keep it out of git, e.g. in .git/info/exclude):
#   .gpu/whl/ray312.tar.xz   Ray 2.60 for CPython 3.12, unpacked and pruned (no jars, rllib, serve, llm, dashboard client)
#   .gpu/whl/*.whl           the pure-Python wheels Ray and the project need (+ torchao 0.18.0 for the offload row; TORCHAO= another)
#   .gpu/cache/              the data cache of gpu_check.sh's `all` part (VADER sentences and their encodings),
#                            encoded here, since the encoder's weights do not travel
#
#   bash benchmarks/gpu_carry.sh
#   bash benchmarks/gpu_carry.sh mid   also the cache of gpu_check.sh's `mid` part: the default data, 10,000 VADER
#                                      sentences and the 23,000 held-out ones, every token's encoding in fp16
#                                      (hundreds of MB; a GPU machine with the encoder installed needs none of it)
# gpu_check.sh unpacks it when `import ray.tune` fails there. PY_VERSION=3.11 builds for another Python.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-.gpu}
case $DEST in /*) ;; *) DEST=$PWD/$DEST ;; esac  # absolute: the steps below run from other folders
PY=${PYTHON:-python}
PYV=${PY_VERSION:-3.12}
mkdir -p "$DEST/whl"
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_28_x86_64 -d "$1" "${@:2}" 2>&1 | { grep -v '^WARNING: Location' || true; }; }  # pip's failure stops the script
tag=${PYV/./}
if [ ! -f "$DEST/whl/ray$tag.tar.xz" ]; then
  tmp=$(mktemp -d)
  dl "$tmp" ray==2.60.0
  mkdir "$tmp/tree" && (cd "$tmp/tree" && unzip -q ../ray-2.60.0-*.whl)
  rm -rf "$tmp"/tree/ray/{jars,rllib,serve,llm,dashboard/client} "$tmp"/tree/ray-2.60.0.dist-info/RECORD
  (cd "$tmp/tree" && tar -cf - . | xz -T2 -6 > "$DEST/whl/ray$tag.tar.xz")
  rm -rf "$tmp"
fi
dl "$DEST/whl" jsonschema jsonschema-specifications referencing rpds-py tensorboardX pydantic pydantic-core \
  annotated-types typing-inspection typing-extensions filelock "${TORCHAO:-torchao==0.18.0}"  # the offload row's
prepare() { $PY run.py prepare "$@" "data.cache_dir=$DEST/cache"; }  # a config's data cache, into $DEST/cache
# The data settings of gpu_check.sh's `all` part (ALL_DATA there), read from the script so the two cannot differ.
mapfile -t ALL_DATA < <(sed -n 's/^ALL_DATA=(\(.*\))$/\1/p' benchmarks/gpu_check.sh | tr ' ' '\n')
prepare configs/redheart-730m.yaml "${ALL_DATA[@]}"
if [ "${1:-}" = mid ]; then
  prepare configs/default.yaml model.preset=mid  # gpu_check.sh's MID: the default data
fi
rm -rf "$DEST/cache/vader/download"
du -sh "$DEST" "$DEST"/*
