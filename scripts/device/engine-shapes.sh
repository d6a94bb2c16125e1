# `moeray bench engine` at published shapes, random weights made on the GPU (no training, no MTP,
# no HF baseline, no prefill): Moonlight-16B-A3B (27 layers) at batch 1, 8, 64 and DeepSeek-V3
# widths cut to 4 layers (1 dense + 3 MoE) at batch 1 and 64, each in bf16 and FP8 (e4m3 +
# 128x128 scales, the serve --weights fp8 path), with the roofline and a profile of 8 decode steps
# per batch. Result files engine-<gpu>-<shape>-<weights>.json, a table and issue 19's targets last
# (`bench/targets.py`). 1 GPU, ~6 minutes;
# Ray is not needed. SHAPES="moonlight v3" and WEIGHTS="bf16 fp8" pick a subset; SHAPES=tiny
# DEVICE=cpu PROFILE_STEPS=2 is the CPU smoke run of the same commands. BATCHES=1,8 replaces the
# shape's batch sizes; V3_LAYERS=8 cuts V3 at 8 layers instead of 4 (the 4-layer cut caps FP8 over
# bf16 at 1.53x: notes-engine.md). A/B of a fast path:
# MOERAY_FUSED_NORM=0 TAG_SUFFIX=-torchnorm (the result records the switches under engine);
# programmatic dependent launch: MOERAY_FUSED_PDL=0 TAG_SUFFIX=-nopdl (engine.pdl: whether it was on).
# AB=ARGMAX,HEAD_GEMV passes --ab: each switch flipped alone in the same run (engine.ab; each
# adds an engine build and its decode runs: raise SHAPES_LIMIT).
# Async scheduling (engine/overlap.py: each greedy decode step launched before the previous one's
# ids are read back) is the engine's default on CUDA; ASYNC=0 passes --no-async-scheduling, ASYNC=1
# --async-scheduling (A/B: ASYNC=0 TAG_SUFFIX=-sync against a plain run). TEMP=1.0 samples the decode
# runs at that temperature (seeded); sampled steps run ahead too unless ASYNC_SAMPLED=0.
# PROMPT_LEN=2048 decodes after longer prompts (default 128), where MLA's cache reads weigh more.
# HF=1 adds transformers' generate on the same weights (bf16 runs; it saves a copy of the model
# and loads a second one: ~2 more minutes at Moonlight's 32 GB; HF_MAX_BATCH, default 8).
rc=0
files=()
for shape in ${SHAPES:-moonlight v3}; do
  case $shape in
    moonlight) args="--preset moonlight_16b_a3b --batch-sizes ${BATCHES:-1,8,64}" ;;
    v3) args="--preset deepseek_v3 --layers ${V3_LAYERS:-4} --dense-layers 1 --batch-sizes ${BATCHES:-1,64}" ;;
    tiny) args="--preset tiny --batch-sizes ${BATCHES:-1,8} --prompt-len 16 --decode-tokens 4" ;;
    *) echo "unknown shape '$shape': moonlight, v3 or tiny"; exit 2 ;;
  esac
  for w in ${WEIGHTS:-bf16 fp8}; do
    tag=$shape-$w${TAG_SUFFIX:-}
    skip=prefill,router-ab,hf,mtp hf=()
    if [ "${HF:-0}" = 1 ] && [ "$w" = bf16 ]; then
      skip=prefill,router-ab,mtp hf=(--hf-max-weight-gib 100 --hf-max-batch ${HF_MAX_BATCH:-8})
    fi
    CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${SHAPES_LIMIT:-140} python3 -m moeray.cli bench engine \
      --device ${DEVICE:-cuda} $args --weights "$w" --mtp-train-steps 0 \
      --profile-steps ${PROFILE_STEPS:-8} --skip $skip "${hf[@]}" --tag "$tag" \
      $(case "${ASYNC:-}" in 1) echo --async-scheduling ;; 0) echo --no-async-scheduling ;; esac) \
      ${TEMP:+--temperature $TEMP} ${AB:+--ab $AB} ${PROMPT_LEN:+--prompt-len $PROMPT_LEN} $(case "${ASYNC_SAMPLED:-}" in 1) echo --async-sampled ;; 0) echo --no-async-sampled ;; esac) \
      --out-dir "$OUT" > "$OUT/engine-$tag.log" 2>&1
    r=$?; [ $r -eq 0 ] || rc=1
    el "bench engine $tag rc=$r"; grep -v "UNEXPECTED\|USDT" "$OUT/engine-$tag.log" | tail -4 | cut -c1-200
    files+=($(ls "$OUT"/engine-*-"$tag".json 2>/dev/null))
  done
done
echo
[ ${#files[@]} -gt 0 ] && python3 -m moeray.platform.engine.bench.table "${files[@]}" || rc=1
# issue 19's targets that these files measure (met or not; says nothing of the exit status)
[ ${#files[@]} -gt 0 ] && { echo; python3 -m moeray.platform.engine.bench.targets "${files[@]}"; }
exit $rc
