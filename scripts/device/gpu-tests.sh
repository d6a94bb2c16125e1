# The GPU tier: tests/gpu, then the compiled-kernel checks in tests/kernels (marker gpu), in two
# pytest processes (env.sh says why). 1 GPU, ~4 minutes; carry .gpu-bundle for the Ray Train job test.
use_bundle  # the Ray Train job test needs Ray
gpu_pytest pytest_gpu.log 300 tests/gpu || rc=1
gpu_pytest pytest_kernels_gpu.log 200 tests/kernels -m gpu || rc=1
exit ${rc:-0}
