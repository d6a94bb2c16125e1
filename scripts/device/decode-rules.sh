# The data for decode's launch rules and this session's engine changes, in one call (1 GPU,
# ~7 minutes): the MLA wgmma recipe (its GPU tests; 128-head graphs at 1-64 sequences and 1K-32K
# tokens, Triton's auto blocks against the WS kernel's 64-row ones: `decode_launch`'s block rule),
# head_gemv at 32 / 64 rows against torch.bmm (the per-head products at decode batch 64), the
# GPU tests of staggered async ends and HEAD_TILE, then V3 widths FP8 batch 64 after
# 2,048-token prompts (the bench now times the whole batch decoding: step ~ graph).
( source scripts/device/mla-wgmma.sh ) || rc=1
CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${HEAD_LIMIT:-150} python3 -m moeray.cli bench kernels \
  --only head_gemv --tag head-rows > "$OUT/head_rows.log" 2>&1 || rc=1
el "bench kernels head_gemv rc=${rc:-0}"
grep -A40 "^head_gemv" "$OUT/head_rows.log" | cut -c1-160
cp benchmarks/results/kernels-*-head-rows.json "$OUT/" 2>/dev/null
gpu_pytest pytest_async.log ${ASYNC_TEST_LIMIT:-150} tests/gpu/test_async_scheduling_gpu.py || rc=1
gpu_pytest pytest_head_tile.log 120 tests/gpu/test_head_gemv_gpu.py -k head_tile || rc=1
( export TAG_SUFFIX=-long2 PROMPT_LEN=2048 PROFILE_STEPS=0 SHAPES=v3 WEIGHTS=fp8 BATCHES=64
  source scripts/device/engine-shapes.sh ) || rc=1
exit ${rc:-0}
