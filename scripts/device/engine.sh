# `moeray bench engine`: decode tokens/s at batch 1-256 against HF generate and the bandwidth
# roofline, prefill, MTP speculation under CUDA graphs. 1 GPU, ~4 minutes.
CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${ENGINE_LIMIT:-300} python3 -m moeray.cli bench engine --device cuda \
  --hf-max-batch 64 --out-dir "$OUT" > "$OUT/engine.log" 2>&1
rc=$?; el "bench engine rc=$rc"; grep -v "UNEXPECTED" "$OUT/engine.log" | tail -8
exit $rc
