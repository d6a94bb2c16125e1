# Prefill chunks replayed from CUDA graphs (EngineConfig.prefill_graph_tokens, default 256,
# engine/step_graphs.py). First the engine GPU tests with every engine's chunk graphs up to
# GRAPH_TOKENS (MOERAY_TEST_PREFILL_GRAPH_TOKENS, tests/gpu/conftest.py; 0: all eager): the
# files of the three that failed as the default in the twentieth session first, in a pytest of
# their own so that its failure reasons print
# before any time limit, then (CHUNK_REST=1, ~4 minutes more) the rest; then `moeray bench engine
# --arrivals` at the Moonlight shape: ARRIVALS (default
# 48) requests of 128-token prompts and 32 output tokens, one every EVERY (default 2) step calls,
# at most BATCH (default 16) running (PROMPT_LENS=LO,HI: prompt lengths drawn from LO..HI, with
# TAG_SUFFIX naming the result apart); every run with chunk graphs up to GRAPH_TOKENS (default
# 256), and two synchronous runs with eager chunks (expanded, absorbed MLA) to compare:
# sync_vs_eager, sync_equals_absorbed (1.0: the graphs compute the eager absorbed chunks'
# tokens), sync_equals_eager, the step times split and each engine's build_s (engine.arrivals
# in engine-<gpu>-moonlight-<w>-chunkgraphs.json). BURST=K: K requests arrive together (same-length
# prompts: an eager step batches them into one forward, the graphs replay up to 8 a graph, and a
# `single` run one chunk a graph; e.g. BURST=16 EVERY=8 TAG_SUFFIX=-burst16). CHUNK_TESTS=0 runs
# the bench only. 1 GPU, ~3 minutes + ~2 a WEIGHTS.
FIRST="tests/gpu/test_fp8_kv_cache_gpu.py tests/gpu/test_tiny_engine_gpu.py::test_fused_decode_kernels_captured_and_equal_to_reference tests/gpu/test_async_scheduling_gpu.py::test_tokens_equal_and_steps_overlap"
REST="tests/gpu/test_tiny_engine_gpu.py tests/gpu/test_sampling_gpu.py tests/gpu/test_engine_mtp_gpu.py tests/gpu/test_prefill_moe_graphs_gpu.py"
# The fp8 test builds fp32 engines (no chunk graph is captured there): without chunk graphs first,
# so a failure of the default path shows apart from one of the graphs.
# graph_capture's test (a collection mid-capture) with it: the capture failure of the async test.
if [ "${CHUNK_TESTS:-1}" = 1 ]; then
  gpu_pytest pytest_fp8_plain.log 90 --tb=short tests/gpu/test_graph_capture_gpu.py \
    tests/gpu/test_fp8_kv_cache_gpu.py::test_kept_fp8_cache_matches_dequantized_fp32 || rc=1
  grep -h "^E  " "$OUT/pytest_fp8_plain.log" | cut -c1-220 | head -12
  # shellcheck disable=SC2086  # lists of paths
  MOERAY_TEST_PREFILL_GRAPH_TOKENS=${GRAPH_TOKENS:-256} gpu_pytest pytest_chunk_first.log \
    ${FIRST_LIMIT:-180} $FIRST --tb=short || rc=1
  grep -h "^FAILED\|^E  \|Error" "$OUT/pytest_chunk_first.log" | cut -c1-220 | head -30
  if [ "${CHUNK_REST:-0}" = 1 ]; then
    # shellcheck disable=SC2086
    MOERAY_TEST_PREFILL_GRAPH_TOKENS=${GRAPH_TOKENS:-256} gpu_pytest pytest_chunk_rest.log \
      ${REST_LIMIT:-240} $REST --tb=short || rc=1
    grep -h "^FAILED\|^E  " "$OUT/pytest_chunk_rest.log" | cut -c1-220 | head -20
  fi
fi
for w in ${WEIGHTS:-fp8}; do
  CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${SHAPES_LIMIT:-300} python3 -m moeray.cli bench engine \
    --preset moonlight_16b_a3b --weights "$w" --mtp-train-steps 0 --batch-sizes ${BATCH:-16} \
    --skip prefill,router-ab,hf,mtp --arrivals ${ARRIVALS:-48} --arrival-every ${EVERY:-2} \
    --arrival-graph-tokens ${GRAPH_TOKENS:-256} ${PROMPT_LENS:+--arrival-prompt-lens $PROMPT_LENS} \
    --arrival-burst ${BURST:-1} \
    --tag "moonlight-$w-chunkgraphs${TAG_SUFFIX:-}" --out-dir "$OUT" \
    > "$OUT/engine-moonlight-$w-chunkgraphs${TAG_SUFFIX:-}.log" 2>&1
  r=$?; [ $r -eq 0 ] || rc=1
  el "bench engine arrivals $w rc=$r"
  grep "^arrivals\|^sync\|^eager\|Error\|not captured" \
    "$OUT/engine-moonlight-$w-chunkgraphs${TAG_SUFFIX:-}.log" | cut -c1-240
done
exit ${rc:-0}
