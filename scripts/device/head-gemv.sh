# head_gemv (MLA's absorbed per-head einsums at decode, opt-in MOERAY_FUSED_HEAD_GEMV=1): its GPU
# tests (Moonlight and V3 heads, both weight layouts, CUDA graph, tiny engine greedy tokens with and
# without), `moeray bench kernels --only head_gemv` against the einsum, then the Moonlight engine
# A/B at batch 1, 8, 64 (plain, then the switch on: engine-<gpu>-moonlight-<w>{,-headgemv}.json).
# 1 GPU, ~5 minutes; WEIGHTS (bf16 fp8) as engine-shapes.
gpu_pytest pytest_head_gemv.log ${HEAD_TEST_LIMIT:-150} tests/gpu/test_head_gemv_gpu.py || rc=1
CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${HEAD_BENCH_LIMIT:-120} python3 -m moeray.cli bench kernels --only head_gemv --tag headgemv > "$OUT/head_gemv_bench.log" 2>&1 || rc=1
el "bench kernels --only head_gemv rc=${rc:-0}"
grep -v '^$' "$OUT/head_gemv_bench.log" | tail -12 | cut -c1-170
cp benchmarks/results/kernels-*-headgemv.json "$OUT/" 2>/dev/null
( SHAPES=moonlight PROFILE_STEPS=2 source scripts/device/engine-shapes.sh ) || rc=1
( MOERAY_FUSED_HEAD_GEMV=1 TAG_SUFFIX=-headgemv SHAPES=moonlight PROFILE_STEPS=2 \
  source scripts/device/engine-shapes.sh ) || rc=1
exit ${rc:-0}
