# `--ep 1` against the plain engine on one GPU: the EP GPU tests (decode CUDA graphs under EP) and
# `moeray bench wide-ep --gpus 1`, whose result has ep1_over_plain (held to >= 0.95) and the
# graph status of both engines. 1 GPU, ~5 minutes. EP_TESTS picks tests (default the file),
# EP_TESTS_LIMIT their seconds.
gpu_pytest pytest_ep_gpu.log ${EP_TESTS_LIMIT:-300} \
  ${EP_TESTS:-tests/gpu/test_engine_ep_gpu.py} || rc=1
CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${WIDE_EP_LIMIT:-300} python3 -m moeray.cli bench wide-ep \
  --preset small --gpus 1 --device cuda --out-dir "$OUT" > "$OUT/wide-ep.log" 2>&1
r=$?; el "bench wide-ep rc=$r"; tail -3 "$OUT/wide-ep.log" | cut -c1-400
[ $r -eq 0 ] || rc=1
exit ${rc:-0}
