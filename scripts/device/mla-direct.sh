# MLA decode's split kernel writing the merged output itself (MOERAY_FUSED_MLA_DIRECT=1, opt-in;
# kernels/mla_decode.py: one split directly, several through the folded merge) checked and timed
# in one call (1 GPU, ~7 minutes): the GPU tests (one split: the merge path's bits; several: its
# values, 16 and 128 heads; eager and from graphs), `bench kernels --only mla_decode_graph`
# without / with it, then Moonlight and the V3 widths at batch 1 and 64, bf16 and FP8, without /
# with it (TAG_SUFFIX -mlamerge / -mladirect). Turn it on by default (`_mla_decode_rows`, and
# `mla_counters` then always makes the workspace) where it wins.
gpu_pytest pytest_mla_direct.log ${MLA_TEST_LIMIT:-150} tests/gpu/test_kernels_gpu.py -k "mla_decode" || rc=1
for mode in 0 1; do
  tag=$([ $mode = 1 ] && echo -mladirect || echo -mlamerge)
  MOERAY_FUSED_MLA_DIRECT=$mode CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${MLA_BENCH_LIMIT:-120} \
    python3 -m moeray.cli bench kernels --only mla_decode_graph --tag mla$tag > "$OUT/mla$tag.log" 2>&1 || rc=1
  el "bench kernels mla_decode_graph$tag rc=${rc:-0}"; grep "^mla_decode graph H=128" "$OUT/mla$tag.log" | cut -c1-150
  cp benchmarks/results/kernels-*-mla$tag.json "$OUT/" 2>/dev/null
  ( export MOERAY_FUSED_MLA_DIRECT=$mode SHAPES="${SHAPES:-moonlight v3}" BATCHES=${BATCHES:-1,64} TAG_SUFFIX=$tag
    export PROFILE_STEPS=${PROFILE_STEPS:-2}; source scripts/device/engine-shapes.sh ) || rc=1
done
exit ${rc:-0}
