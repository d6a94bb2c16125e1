# DeepSeek-V3 itself, expert-parallel over 8 GPUs of one host (the multi-GPU issue's run): all 61
# layers, dummy e4m3 weights with 128x128 block scales built on each GPU (~101 GB a GPU at ep=8:
# 32 of 256 routed experts a layer, attention and shared experts replicated), 64 requests a rank,
# decode graphs over the gathered exchange -> wide-ep-<gpu>-v3-ep8.json. Then the scaling run at
# 8 of V3's layers (1 GPU holds them) over 1, 2, 4 and 8 GPUs with NCCL's all_to_all_single
# bandwidth and the placement ratios under skew -> wide-ep-<gpu>-v3-8layers.json. 8 GPUs, carry
# nothing (Ray is not used), ~10 minutes: V3LIMIT and SCALELIMIT are each run's seconds.
rc=0
CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 timeout -k 5 ${V3LIMIT:-420} python3 -m moeray.cli bench wide-ep \
  --preset deepseek_v3 --fp8 --gpus 8 --batch 64 --device cuda --tag v3-ep8 --out-dir "$OUT" \
  > "$OUT/wide-ep-v3-ep8.log" 2>&1 || rc=1
el "bench wide-ep V3 ep=8 rc=$rc"; tail -2 "$OUT/wide-ep-v3-ep8.log" | cut -c1-400
CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 timeout -k 5 ${SCALELIMIT:-420} python3 -m moeray.cli bench wide-ep \
  --preset deepseek_v3 --fp8 --layers 8 --gpus 1,2,4,8 --batch 64 --device cuda --tag v3-8layers \
  --out-dir "$OUT" > "$OUT/wide-ep-v3-8layers.log" 2>&1
r=$?; el "bench wide-ep V3 8 layers, 1-8 GPUs rc=$r"; tail -2 "$OUT/wide-ep-v3-8layers.log" | cut -c1-400
[ $r -eq 0 ] || rc=1
exit $rc
