# Where an MTP cycle's time goes under async scheduling against plain decoding's step
# (scripts/mtp_cycle_profile.py: wall, host launch / resolve / wait, GPU busy and kernels per
# engine call; random weights, small preset), at batch 1 and 16 (BATCHES), after the MTP GPU tests
# (TESTS=0 skips them; TESTS_K picks them with pytest -k). 1 GPU, ~3 min.
rc=0
if [ "${TESTS:-1}" = 1 ]; then
  gpu_pytest mtp-cycle-tests.log ${TEST_LIMIT:-240} tests/gpu/test_engine_mtp_gpu.py \
    ${TESTS_K:+-k "$TESTS_K"} || rc=1
fi
for b in ${BATCHES:-1 16}; do
  CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${CYCLE_LIMIT:-150} python3 scripts/mtp_cycle_profile.py \
    --preset ${PRESET:-small} --batch $b --out "$OUT" > "$OUT/mtp_cycle_b$b.log" 2>&1 || rc=1
  el "mtp cycle batch $b"; grep -A20 "^preset" "$OUT/mtp_cycle_b$b.log" | grep -v "^/\|json$"
done
exit $rc
