# MLA decode's 64-row (wgmma) block rule (kernels/mla_launch.py WGMMA_MIN_BLOCKS: V3's 128 heads
# from 8 sequences; MOERAY_FUSED_MLA_WIDE=0 keeps the Triton rule, from 33): the wgmma GPU tests
# (the rule's picks at 8 short sequences in a 2,560-page table and at one long one), `bench
# kernels --only mla_decode_graph` (128 heads at 1-64 sequences, also short contexts in a
# 2,560-page table as decode graphs capture them), then V3 widths FP8 at batch 8 and 16 with the
# rule flipped off (`--ab ARGMAX,MLA_WIDE`: on an 80 GB H100 the first A/B row runs out of
# memory, so ARGMAX takes it) after 128- and 2,048-token prompts. 1 GPU, ~7 minutes.
gpu_pytest pytest_mla_wide.log ${WIDE_TEST_LIMIT:-150} tests/gpu/test_mla_wgmma_gpu.py || rc=1
CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${WIDE_BENCH_LIMIT:-200} python3 -m moeray.cli bench kernels \
  --only mla_decode_graph --tag mla-wide > "$OUT/mla_wide.log" 2>&1 || rc=1
el "bench kernels mla_decode_graph rc=${rc:-0}"
grep "^mla_decode" "$OUT/mla_wide.log" | grep "H=128" | cut -c1-150
cp benchmarks/results/kernels-*-mla-wide.json "$OUT/" 2>/dev/null
for p in ${WIDE_PROMPTS:-128 2048}; do
  ( export SHAPES=v3 WEIGHTS=fp8 BATCHES=${WIDE_BATCHES:-8,16} AB=ARGMAX,MLA_WIDE PROMPT_LEN=$p \
      TAG_SUFFIX=-wide-$p PROFILE_STEPS=0 SHAPES_LIMIT=${WIDE_ENGINE_LIMIT:-240}
    source scripts/device/engine-shapes.sh ) || rc=1
  grep -A8 "^ab " "$OUT/engine-v3-fp8-wide-$p.log" | cut -c1-100
done
exit ${rc:-0}
