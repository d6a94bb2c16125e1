# The GPU tier: tests/gpu, then the compiled-kernel checks in tests/kernels (marker gpu), in two
# pytest processes (env.sh says why). 1 GPU, ~7 minutes with the Ray Train job test; carry
# .gpu-bundle for it. GPU_TESTS="tests/gpu/test_a.py tests/gpu/test_b.py::test_c" runs a subset
# (GPU_LIMIT seconds, default 300); KERNEL_TESTS=0 leaves out the tests/kernels tier.
use_bundle  # the Ray Train job test needs Ray
gpu_pytest pytest_gpu.log ${GPU_LIMIT:-300} ${GPU_TESTS:-tests/gpu} || rc=1
[ "${KERNEL_TESTS:-1}" = 0 ] || gpu_pytest pytest_kernels_gpu.log 200 tests/kernels -m gpu || rc=1
exit ${rc:-0}
