# The KV cache between a prefill and a decode actor over each transport (`moeray bench kv`), then
# Serve P/D (1 prefill + 1 decode) against 2 colocated replicas (`moeray bench serve --launch`).
# 2 GPUs, ~6 minutes; carry .gpu-bundle (Ray is not in the GPU image).
use_bundle
timeout -k 5 150 python3 -m moeray.cli bench kv --device cuda --tokens 64,512,4096 --iters 20 \
  --budget-s 6 --timeout-s 40 --out-dir "$OUT" > "$OUT/kv.log" 2>&1 || rc=1
el "bench kv"; grep -v "^\s*$" "$OUT/kv.log" | tail -12
timeout -k 5 ${SERVE_LIMIT:-240} python3 -m moeray.cli bench serve --launch --gpus-per-replica 1 \
  --cpus-per-replica 2 --num-requests 48 --concurrency 8 --input-len 128 --output-len 128 \
  --results-dir "$OUT" > "$OUT/serve.log" 2>&1 || rc=1
el "bench serve"; grep -v "raylet\|INFO" "$OUT/serve.log" | tail -10
exit ${rc:-0}
