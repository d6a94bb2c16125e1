# MLA decode's wgmma split kernels (the default on Hopper for 64-row head blocks: the
# warp-specialized kernels/mla_decode_ws.py; MOERAY_FUSED_MLA_WS=0 the plain
# kernels/mla_decode_wgmma.py; MOERAY_FUSED_MLA_WGMMA=0 the Triton kernel): their GPU tests (the
# reference at ragged lengths with NaN outside every sequence, the Triton kernel's output, CUDA
# graph replay) and the Triton MLA decode tests beside them, then `moeray bench kernels --only
# mla_decode_graph`: 128 heads at batch 64 / 4K and 4 x 16K, the three kernels in the same run
# (graph ms, TFLOP/s). 1 GPU, ~2 minutes.
gpu_pytest pytest_mla_wgmma.log ${WGMMA_TEST_LIMIT:-150} tests/gpu/test_mla_wgmma_gpu.py \
  tests/gpu/test_kernels_gpu.py -k "wgmma or mla_decode" || rc=1
CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${WGMMA_BENCH_LIMIT:-200} python3 -m moeray.cli bench kernels \
  --only mla_decode_graph --tag ${TAG:-mla-wgmma} > "$OUT/mla_wgmma.log" 2>&1 || rc=1
el "bench kernels mla_decode_graph rc=${rc:-0}"
grep "^mla_decode\|failed\|Error" "$OUT/mla_wgmma.log" | cut -c1-190
cp benchmarks/results/kernels-*-${TAG:-mla-wgmma}.json "$OUT/" 2>/dev/null
exit ${rc:-0}
