# Where a one-GPU training step's time goes, by launching source line: scripts/train_step_profile.py
# at Moonlight-16B-A3B widths cut to LAYERS (default 4: 1 dense + 3 MoE), 4096-token micro-batches
# x MICRO (default 2), for each of RUNS (default "bf16 fp8-kgrouped"). Tables in $OUT/*.log and
# train-step-sources-<gpu>-<run>.json; HOST=1 adds the host side (cProfile, CUDA syncs).
# 1 GPU, ~1.5 minutes a run; Ray is not needed.
for r in ${RUNS:-bf16 fp8-kgrouped}; do
  case $r in bf16) flags="" ;; fp8) flags="--fp8" ;; fp8-kgrouped) flags="--fp8 --kgrouped" ;;
    fp8-bf16wgrad) flags="--fp8 --bf16-wgrad" ;;
    *) echo "unknown run '$r': bf16, fp8, fp8-kgrouped or fp8-bf16wgrad"; exit 2 ;; esac
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${PROFILE_LIMIT:-200} \
    python3 scripts/train_step_profile.py --model moonlight_16b_a3b --layers ${LAYERS:-4} --device cuda \
    --seq-len ${SEQ:-4096} --microbatches ${MICRO:-2} $flags ${HOST:+--host} --rows ${ROWS:-45} --out "$OUT" \
    > "$OUT/train-profile-$r.log" 2>&1 || rc=1
  el "train profile $r"; grep -v "Warning\|warn" "$OUT/train-profile-$r.log" | grep -A200 "^## " | cut -c1-200 | head -${SHOW:-70}
  [ -z "${HOST:-}" ] || grep -A${ROWS:-45} '^## host' "$OUT/train-profile-$r.log" | cut -c1-160
done
exit ${rc:-0}
