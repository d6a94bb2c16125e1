# The decode candidates built without a GPU, checked and timed in one call (1 GPU, ~8 minutes):
# GPU tests of moe_gemv (the MoE at 1-2 tokens without alignment) and of both moe_align kernels
# (the PDL PTX rule included), then their timings against what runs now: decode_glue (moe_align
# "small" vs "wide" at 1-170 tokens, Moonlight and V3 experts), moe_decode_sweep --path both
# (moe_gemv vs the aligned fused MoE at 1 and 2 tokens) and the MLA decode sweep at short
# contexts. The engine A/B that decides moe_gemv's default comes after, in its own call:
#   MOERAY_FUSED_MOE_GEMV=1 TAG_SUFFIX=-moegemv BATCHES=1,8 scripts/device/run.sh engine-shapes
#   BATCHES=1,8 scripts/device/run.sh engine-shapes
slug=$(python3 -c 'from moeray.results import device_slug as d; print(d())')
gpu_pytest pytest_decode_next_gpu.log 200 tests/gpu/test_moe_gemv_gpu.py tests/gpu/test_pdl_gpu.py || rc=1
gpu_pytest pytest_align_gpu.log 150 tests/kernels/test_moe_align.py -m gpu || rc=1
grep "moe_align \(small\|wide\|ref\)" "$OUT/pytest_align_gpu.log" | head -24
CUDA_VISIBLE_DEVICES=0 timeout -k 5 120 python3 -m moeray.cli bench kernels --only decode_glue \
  --tag decode-next > "$OUT/decode_glue.log" 2>&1 || rc=1
el "decode_glue"; grep -i "moe_align" "$OUT/decode_glue.log" | head -24
cp "$(ls -t benchmarks/results/kernels-*.json | head -1)" "$OUT/" 2>/dev/null
PYTHONPATH=. CUDA_VISIBLE_DEVICES=0 timeout -k 5 150 python3 scripts/moe_decode_sweep.py \
  --path both --tokens 1,2 --block-m 16 --block-n 32,64 --stages 4 \
  --out "$OUT/moe-decode-sweep-gemv-$slug.json" > "$OUT/moe_decode_sweep.log" 2>&1 || rc=1
el "moe_decode_sweep"; sed -n '/^best/,$p' "$OUT/moe_decode_sweep.log" | head -20
PYTHONPATH=. CUDA_VISIBLE_DEVICES=0 timeout -k 5 150 python3 scripts/mla_decode_sweep.py \
  --out "$OUT/mla-decode-sweep-$slug.json" > "$OUT/mla_decode_sweep.log" 2>&1 || rc=1
el "mla_decode_sweep"; tail -20 "$OUT/mla_decode_sweep.log"
exit ${rc:-0}
