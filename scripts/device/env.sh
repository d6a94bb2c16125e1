# Sourced by scripts/device/run.sh: the device machine's environment and helpers for a recipe.
# NVLink multicast stays off (the device tool's KINDS.md says why); $OUT comes back from the device.
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 NCCL_DEBUG=WARN
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
T0=${T0:-$(date +%s)}
el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
# Ray, FastAPI and pydantic are not in the GPU image: unpack the bundle made by
# ../shared/tools/gpu-bundle (carry .gpu-bundle). A no-op when the bundle is not there.
use_bundle() {
  [ -f .gpu-bundle/site.tar.xz ] || { echo "no .gpu-bundle: Ray is not importable"; return 0; }
  mkdir -p /tmp/site && tar xJf .gpu-bundle/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
}
# gpu_pytest LOG SECONDS FILES...: pytest on GPU 0 into $OUT/LOG, then its summary lines. One
# pytest process per directory: tests/kernels sets TRITON_INTERPRET=1 for its whole process, which
# tests/gpu/conftest.py refuses.
gpu_pytest() {
  local log=$1 limit=$2; shift 2
  CUDA_VISIBLE_DEVICES=0 timeout -k 5 "$limit" python3 -m pytest -v -s --durations=15 -p no:cacheprovider "$@" > "$OUT/$log" 2>&1
  local rc=$?
  el "pytest $* rc=$rc"; grep "passed\|failed\|skipped\|error" "$OUT/$log" | tail -6 | cut -c1-200
  # cut off by the limit (no summary line): the counts so far and what failed
  [ $rc -ne 124 ] || echo "cut at ${limit}s: $(grep -c ' PASSED' "$OUT/$log") passed," \
    "$(grep -c ' FAILED' "$OUT/$log") failed; last: $(grep '::' "$OUT/$log" | tail -1 | cut -c1-120)"
  grep -h "^FAILED\|^ERROR\|::.* FAILED" "$OUT/$log" | cut -c1-200 | head -20
  return $rc
}
