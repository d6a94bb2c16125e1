# Greedy MTP steps under async scheduling as one CUDA graph each (engine/spec_step.py SpecGraph,
# the default; MOERAY_FUSED_SPEC_GRAPH=0 the two-graph step): the MTP GPU tests (TESTS=0 skips
# them), then scripts/mtp_cycle_profile.py with the switch off and on at BATCHES (default 1 16):
# wall, host launch, GPU busy and kernels per cycle. The bench's speedups: the mtp-async recipe.
# 1 GPU, ~3 min.
rc=0
if [ "${TESTS:-1}" = 1 ]; then
  gpu_pytest spec-graph-tests.log ${TEST_LIMIT:-240} tests/gpu/test_engine_mtp_gpu.py \
    -k "${TESTS_K:-spec_graph or async_spec}" || rc=1
fi
for b in ${BATCHES:-1 16}; do
  for g in 0 1; do
    mkdir -p "$OUT/spec-graph$g"
    CUDA_VISIBLE_DEVICES=0 MOERAY_FUSED_SPEC_GRAPH=$g timeout -k 5 ${CYCLE_LIMIT:-150} \
      python3 scripts/mtp_cycle_profile.py --preset ${PRESET:-small} --batch $b \
      --out "$OUT/spec-graph$g" > "$OUT/spec_graph${g}_b$b.log" 2>&1 || rc=1
    el "mtp cycle batch $b SPEC_GRAPH=$g"
    grep -A3 "^arm" "$OUT/spec_graph${g}_b$b.log"
  done
done
exit $rc
