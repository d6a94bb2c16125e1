# The shared experts on a second CUDA stream (model/shared_stream.py, the default;
# MOERAY_FUSED_SHARED_STREAM=0 turns it off): its GPU tests, then `bench engine --ab SHARED_STREAM` at the shapes
# in SHAPES (default Moonlight) and WEIGHTS (default fp8), batches BATCHES (default 1,8,64: batch 1
# and 8 run the shared experts fused, so their rows are the run's noise). The main run is the
# engine as shipped (the defaults table). 1 GPU, ~4 minutes a shape and weights; SKIP_TESTS=1 skips
# the tests; AB=ARGMAX,SHARED_STREAM at V3 widths on an 80 GB card (its first row runs beside the
# main engine and may not fit).
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  gpu_pytest shared-stream-tests.log ${GPU_LIMIT:-240} tests/gpu/test_shared_stream_gpu.py || rc=1
fi
export SHAPES="${SHAPES:-moonlight}" WEIGHTS="${WEIGHTS:-fp8}" BATCHES=${BATCHES:-1,8,64}
export PROFILE_STEPS=${PROFILE_STEPS:-4} AB=${AB:-SHARED_STREAM} TAG_SUFFIX=${TAG_SUFFIX:--sstream}
export SHAPES_LIMIT=${SHAPES_LIMIT:-330}
( source scripts/device/engine-shapes.sh ) || rc=1
for f in "$OUT"/engine-*"$TAG_SUFFIX".log; do
  [ -f "$f" ] && { echo "== $f"; grep -A12 "^ab  " "$f" | cut -c1-120; }
done
exit ${rc:-0}
