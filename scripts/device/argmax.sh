# Greedy's argmax in one launch (MOERAY_FUSED_ARGMAX=1, opt-in; kernels/argmax.py) checked and
# timed (1 GPU, ~4 minutes): its GPU test through Sampler.greedy_ids (V3's and Moonlight's
# vocabularies, batch 1/64/300, ties and NaNs), `bench kernels --only decode_glue` (argmax_v3 and
# argmax_moonlight rows: the kernel against the engine's fp32 copy + torch.argmax from CUDA graphs,
# bit-compared), then the engine A/B at V3 widths FP8 and Moonlight bf16, batch 1 and 64. Make it
# the default (greedy_ids without the switch) where it wins at both shapes.
gpu_pytest pytest_argmax.log ${TEST_LIMIT:-120} tests/gpu/test_sampling_gpu.py -k argmax || rc=1
CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${BENCH_LIMIT:-120} python3 -m moeray.cli bench kernels \
  --only decode_glue --tag argmax > "$OUT/argmax_glue.log" 2>&1 || rc=1
el "bench kernels decode_glue rc=${rc:-0}"; grep "argmax\|failed" "$OUT/argmax_glue.log" | cut -c1-160
cp benchmarks/results/kernels-*-argmax.json "$OUT/" 2>/dev/null
for case in "v3 fp8" "moonlight bf16"; do
  set -- $case
  ( export AB=ARGMAX SHAPES=$1 WEIGHTS=$2 BATCHES=1,64 TAG_SUFFIX=-argmax SHAPES_LIMIT=${SHAPES_LIMIT:-150}
    source scripts/device/decode-ab.sh ) || rc=1
done
exit ${rc:-0}
