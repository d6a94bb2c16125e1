# The bf16 gemv's tile sweep alone (1 GPU, ~3 minutes): `bench kernels --only gemv_sweep` with a
# longer budget (GEMV_SWEEP_S, default 150 s) so the 1- and 2-warp split-K tiles at the end of
# `sweep_candidates` are reached at every layer (Moonlight q_proj / kv_a / o_proj, V3 o_proj at
# M = 1 and 4). Whether the bf16 gemv gains what fp8_gemv did from small-warp split tiles
# (benchmarks/notes-engine.md); `bcast_config` is tuned from the result.
CUDA_VISIBLE_DEVICES=0 timeout -k 5 $(( ${GEMV_SWEEP_S:-150} + 60 )) python3 -m moeray.cli bench kernels \
  --only gemv_sweep --gemv-sweep-s ${GEMV_SWEEP_S:-150} --tag gemv-sweep > "$OUT/gemv_sweep.log" 2>&1 || rc=1
el "bench kernels --only gemv_sweep rc=${rc:-0}"; grep "^sweep" "$OUT/gemv_sweep.log" | cut -c1-200
cp benchmarks/results/kernels-*-gemv-sweep.json "$OUT/" 2>/dev/null
exit ${rc:-0}
