# moe_gemv's down launch with its own tiles (config "down", kernels/moe_gemv.py): at Moonlight FP8
# batch 1 on an H100 it took 13.5 us a layer for 6.9 us of e4m3 bytes (~51%) where gate/up reached
# ~79% with the same 16-row, 2-warp tile (benchmarks/notes-engine.md). The whole MoE in a CUDA
# graph (scripts/moe_decode_sweep.py --path gemv), gate/up fixed at the default tile, down over
# DOWN_TILES (BLOCK_N:warps:stages), Moonlight and V3 experts at 1 and 2 tokens, bf16 and FP8.
# 1 GPU, ~3 minutes. Set `moe_gemv_config`'s "down" from the best rows, then the engine A/B.
SLUG=$(python3 -c 'from moeray.results import device_slug as d; print(d())')
PYTHONPATH=. CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${SWEEP_LIMIT:-240} python3 scripts/moe_decode_sweep.py \
  --path gemv --shapes ${SHAPES:-moonlight,v3} --tokens 1,2 --gemv-block-n 16 --gemv-warps 2 \
  --gemv-stages 4 --gemv-down ${DOWN_TILES:-16:2:4,32:2:4,32:4:4,64:4:4,64:8:3,128:8:3} \
  --out "$OUT/moe-gemv-down-sweep-$SLUG.json" > "$OUT/moe_gemv_down_sweep.log" 2>&1 || rc=1
el "moe_decode_sweep --gemv-down rc=${rc:-0}"
sed -n '/^best/,$p' "$OUT/moe_gemv_down_sweep.log"; grep -i "error" "$OUT/moe_gemv_down_sweep.log" | head -3
grep " t=  1 fp8 \| t=  1 bf16" "$OUT/moe_gemv_down_sweep.log" | cut -c1-110
exit ${rc:-0}
