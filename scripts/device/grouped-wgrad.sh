# grouped_wgrad (the BF16 experts' k-grouped weight-gradient GEMM, fp32 out / added into the
# gradient): its compiled GPU check (Moonlight and V3 shapes against the fp32 reference, empty
# experts, accumulate bit-equal, one compiled variant for any token count, timed against
# torch._grouped_mm + cast + add), the wired path in a tiny model against the per-expert loop
# (tests/gpu/test_train_one_gpu.py), then `moeray bench kernels --only grouped_wgrad,
# grouped_wgrad_sweep,fp8_kgrouped_sweep` (10 tiles each, accumulate and fresh; the second the
# FP8 k-grouped weight-grad GEMM's) and their tables. 1 GPU, ~4 minutes. GWGRAD_SECTIONS picks.
gpu_pytest grouped_wgrad_tests.log ${GWGRAD_TEST_LIMIT:-120} tests/kernels/test_grouped_wgrad.py -m gpu || rc=1
grep -A8 "^moonlight gate" "$OUT/grouped_wgrad_tests.log" | grep -v "^$" | cut -c1-230
gpu_pytest grouped_wgrad_train.log ${GWGRAD_TRAIN_LIMIT:-90} tests/gpu/test_train_one_gpu.py -k grouped_experts_equal_the_loop || rc=1
CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${GWGRAD_BENCH_LIMIT:-150} python3 -m moeray.cli bench kernels --only ${GWGRAD_SECTIONS:-grouped_wgrad,grouped_wgrad_sweep,fp8_kgrouped_sweep} --tag grouped-wgrad > "$OUT/grouped_wgrad_bench.log" 2>&1 || rc=1
el "bench kernels (grouped_wgrad sections) rc=${rc:-0}"
sed -n '/^grouped_wgrad  /,/^$/p' "$OUT/grouped_wgrad_bench.log" | cut -c1-200
grep "^sweep best" "$OUT/grouped_wgrad_bench.log" | cut -c1-200
grep "failed\|Error" "$OUT/grouped_wgrad_bench.log" | head -5
cp benchmarks/results/kernels-*-grouped-wgrad.json "$OUT/" 2>/dev/null
exit ${rc:-0}
