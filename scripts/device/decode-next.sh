# The decode kernels built without a GPU besides moe_gemv (its own recipe: moe-gemv), checked and
# timed in one call (1 GPU, ~6 minutes): the moe_align GPU test (the kernel equal to the reference
# from 1 to 1,024 tokens at 7-384 experts, under a CUDA graph too, and both timed at 1-256 tokens),
# decode_glue (each decode glue kernel against its PyTorch reference; moe_align at 1-170 tokens
# with Moonlight's and V3's experts) and the MLA decode sweep at short contexts
# (scripts/mla_decode_sweep.py: head block, warps, stages, splits at 160 and 1,024 tokens).
slug=$(python3 -c 'from moeray.results import device_slug as d; print(d())')
gpu_pytest pytest_align_gpu.log 150 tests/kernels/test_moe_align.py -m gpu || rc=1
grep "moe_align \(kernel\|ref\)" "$OUT/pytest_align_gpu.log" | head -24
CUDA_VISIBLE_DEVICES=0 timeout -k 5 120 python3 -m moeray.cli bench kernels --only decode_glue \
  --tag decode-next > "$OUT/decode_glue.log" 2>&1 || rc=1
el "decode_glue"; grep -i "moe_align" "$OUT/decode_glue.log" | head -24
cp "$(ls -t benchmarks/results/kernels-*.json | head -1)" "$OUT/" 2>/dev/null
PYTHONPATH=. CUDA_VISIBLE_DEVICES=0 timeout -k 5 150 python3 scripts/mla_decode_sweep.py \
  --out "$OUT/mla-decode-sweep-$slug.json" > "$OUT/mla_decode_sweep.log" 2>&1 || rc=1
el "mla_decode_sweep"; tail -20 "$OUT/mla_decode_sweep.log"
exit ${rc:-0}
