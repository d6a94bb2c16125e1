# The GPU tier: tests/gpu, then the compiled-kernel checks in tests/kernels (marker gpu), in two
# pytest processes (env.sh says why). 1 GPU; carry .gpu-bundle for the Ray Train job test. The
# whole tier takes longer than one 600 s call (tests/gpu past 360 s, tests/kernels past 200 s):
# GPU_PART=1/2 and GPU_PART=2/2 run halves of tests/gpu's files (sorted, alternating) and
# KERNEL_TESTS=0 leaves out the tests/kernels tier; GPU_TESTS="tests/gpu/test_a.py
# tests/gpu/test_b.py::test_c" runs a subset (GPU_LIMIT seconds, default 300), GPU_TESTS=none
# the kernel tier alone; KERNEL_PART=k/n runs part of the kernel tier's files (those with a gpu
# mark, sorted, alternating; KERNEL_LIMIT seconds, default 200).
use_bundle  # the Ray Train job test needs Ray
# part K/N FILES...: the K-th of N alternating shares of the sorted FILES, space-separated
part() {
  local k=${1%/*} n=${1#*/}; shift
  printf '%s\n' "$@" | sort | awk -v k="$k" -v n="$n" '(NR - 1) % n == k - 1' | tr '\n' ' '
}
tests=${GPU_TESTS:-tests/gpu}
if [ -n "${GPU_PART:-}" ]; then
  tests=$(part "$GPU_PART" tests/gpu/test_*.py)
  echo "GPU_PART $GPU_PART: $(echo $tests | wc -w) files"
fi
# shellcheck disable=SC2086  # a list of paths
[ "$tests" = none ] || gpu_pytest pytest_gpu.log ${GPU_LIMIT:-300} $tests || rc=1
kernel_tests=tests/kernels
if [ -n "${KERNEL_PART:-}" ]; then
  # shellcheck disable=SC2046  # a list of paths
  kernel_tests=$(part "$KERNEL_PART" $(grep -l "mark.gpu" tests/kernels/test_*.py))
  echo "KERNEL_PART $KERNEL_PART: $(echo $kernel_tests | wc -w) files"
fi
# shellcheck disable=SC2086  # a list of paths
[ "${KERNEL_TESTS:-1}" = 0 ] || gpu_pytest pytest_kernels_gpu.log ${KERNEL_LIMIT:-200} $kernel_tests -m gpu || rc=1
exit ${rc:-0}
