#!/usr/bin/env bash
# Issue 16's GPU run, on a GPU machine that cannot reach a package index:
#   bash benchmarks/gpu_suite.sh OUT [BUDGET_S [gpu_suite.py options...]]
# Needs, in the repository root: .whl/ (wheels the GPU image lacks: deepspeed built with
# DS_BUILD_OPS=0, hjson, pydantic + pydantic_core + annotated_types + typing_inspection, datasets +
# dill + multiprocess, pymunk + cffi + pycparser) and .mbsrc/ (the sdists of megablocks 0.10.0,
# grouped_gemm 0.3.0 and stanford-stk 0.7.1, built here against the machine's own torch, sm_90).
# The image's python3 and torch are used as they are (the project's torch pin is for CPU boxes).
# Making the two folders on a machine with a package index (list them in .git/info/exclude):
#   DS_BUILD_OPS=0 .venv/bin/pip wheel --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     hjson pydantic pydantic_core annotated-types typing-inspection datasets dill multiprocess pymunk cffi pycparser
#   (pin each to the version in .venv; the GPU image's python is 3.12), and the three sdists from
#   https://pypi.org/simple/{megablocks,grouped-gemm,stanford-stk}/ into .mbsrc/.
# Measured on an H200 (2026-11-29): BENCHMARKS.md, "The GPU path on one H200".
set -u
OUT=${1:?usage: gpu_suite.sh OUT [BUDGET_S]}
BUDGET=${2:-420}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SITE=/tmp/sd_site MB=/tmp/mb
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$ROOT"/.whl/*.whl >"$OUT/install.log" 2>&1 \
  || { echo "wheel install failed:"; tail -20 "$OUT/install.log"; }
(cd "$ROOT" && python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --target "$SITE" .) >>"$OUT/install.log" 2>&1 \
  || { echo "sparse-dit install failed:"; tail -20 "$OUT/install.log"; }
export PYTHONPATH=$SITE
echo "installed in $(( $(date +%s) - t0 )) s"
# megablocks + grouped_gemm + stk, built in the background while the suite's untimed checks run
# (GPU_SUITE_MEGABLOCKS=0 skips the build: a rerun that only times our own paths)
rm -f "$MB.done"
[ "${GPU_SUITE_MEGABLOCKS:-1}" = 0 ] && echo "megablocks build skipped (GPU_SUITE_MEGABLOCKS=0)" >"$MB.done" || (

  mkdir -p "$MB/src" && cd "$MB/src" && for f in "$ROOT"/.mbsrc/*.tar.gz; do tar xzf "$f"; done
  export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=6
  b0=$(date +%s)
  (cd grouped_gemm-0.3.0 && python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target "$MB/gg" .) >"$MB/gg.log" 2>&1 &
  (cd megablocks-0.10.0 && python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target "$MB/mb" .) >"$MB/mb.log" 2>&1 &
  (cd stanford_stk-0.7.1 && python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target "$MB/stk" .) >"$MB/stk.log" 2>&1 &
  wait
  status="built in $(( $(date +%s) - b0 )) s"
  for n in gg mb stk; do
    { grep -n -i -E "error|undefined|no member|not declared" "$MB/$n.log" | head -40; echo ...; tail -c 1500 "$MB/$n.log"; } >"$OUT/build_$n.log"
  done
  if [ ! -d "$MB/mb/megablocks" ]; then
    # megablocks_ops (its CUDA extension, used by the dMoE layers, not by our backend) did not
    # build: install the Python package alone; the suite then loads grouped_gemm_util by itself
    mkdir -p "$MB/mb" && cp -r megablocks-0.10.0/megablocks "$MB/mb/" && status="$status; megablocks_ops failed, Python package copied"
  fi
  echo "$status" >"$MB.done"
) &
shift 2 2>/dev/null || shift $#
python3 "$ROOT/benchmarks/gpu_suite.py" --out "$OUT" --budget-s "$BUDGET" \
  --megablocks-done "$MB.done" --megablocks-path "$MB/gg" "$MB/mb" "$MB/stk" "$@" 2>&1 | tee "$OUT/suite.log"
