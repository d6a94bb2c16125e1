# Long-prompt prefill through MLA's expanded path (the engine's default for prefill chunks) and
# through the absorbed one, in one `moeray bench engine` run per shape: 2 prompts of 4,096 tokens
# (PREFILL_LEN), max_num_batched_tokens 4,096, so each prompt prefills in one chunk from position
# 0 (the Triton mla_prefill kernel). Moonlight-16B-A3B (27 layers) and DeepSeek-V3 widths cut to
# 4 layers, bf16 (WEIGHTS=fp8 for e4m3). Decode is timed only at batch 1 for 4 tokens. Result
# files engine-<gpu>-<shape>-<weights>-prefill.json with prefill_tokens_per_s_by_attention.
# 1 GPU, ~3 minutes. SHAPES=tiny DEVICE=cpu PREFILL_LEN=256 is the CPU smoke run.
rc=0
for shape in ${SHAPES:-moonlight v3}; do
  case $shape in
    moonlight) args="--preset moonlight_16b_a3b" ;;
    v3) args="--preset deepseek_v3 --layers 4 --dense-layers 1" ;;
    tiny) args="--preset tiny --prompt-len 16" ;;
    *) echo "unknown shape '$shape': moonlight, v3 or tiny"; exit 2 ;;
  esac
  for w in ${WEIGHTS:-bf16}; do
    tag=$shape-$w-prefill
    CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${PREFILL_LIMIT:-150} python3 -m moeray.cli bench engine \
      --device ${DEVICE:-cuda} $args --weights "$w" --mtp-train-steps 0 --batch-sizes 1 \
      --decode-tokens 4 --prefill-batch 2 --prefill-len ${PREFILL_LEN:-4096} \
      --skip router-ab,hf,mtp --tag "$tag" --out-dir "$OUT" > "$OUT/engine-$tag.log" 2>&1
    r=$?; [ $r -eq 0 ] || rc=1
    el "bench engine $tag rc=$r"; grep "prefill_tokens_per_s" "$OUT/engine-$tag.log" | cut -c1-200
  done
done
exit $rc
