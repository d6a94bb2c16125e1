# The routed experts' training SwiGLU (kernels/swiglu_train.py: one launch forward, one backward,
# each optionally writing the 1x128 FP8 quantization of its outputs): the compiled GPU check of
# tests/kernels/test_swiglu_train.py (h, dg, du bit-equal to PyTorch's CUDA ops and their
# quantizations to act_quant, at Moonlight's I 1408 and odd shapes, fp32/bf16/fp16; the experts'
# BF16 and FP8 grouped paths bit-equal with and without the kernels), then `moeray bench kernels
# --only swiglu_train` (PyTorch's ops [+ act_quant] vs the kernels [with quant], forward and
# backward, at P 52,864 x I 1408 bf16: times, kernels, TB/s and fraction of the copy, ms a step,
# bits, the kernels' time at 8 to 64 rows a program) and its table. 1 GPU, ~5 minutes, mostly
# compiling (3 dtypes x 4 kernel variants in the check). For the end-to-end step:
# scripts/device/run.sh train-1gpu, once as is and once with MOERAY_FUSED_SWIGLU_TRAIN=0.
gpu_pytest swiglu_train_tests.log ${SWIGLU_TRAIN_TEST_LIMIT:-330} tests/kernels/test_swiglu_train.py -m gpu || rc=1
grep "RESULT\|MISMATCH\|NONDETERMINISTIC" "$OUT/swiglu_train_tests.log" | cut -c1-200
CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${SWIGLU_TRAIN_BENCH_LIMIT:-180} python3 -m moeray.cli bench kernels --only swiglu_train --tag swiglu-train > "$OUT/swiglu_train_bench.log" 2>&1 || rc=1
el "bench kernels --only swiglu_train rc=${rc:-0}"
grep "^swiglu_train \|failed\|Error" "$OUT/swiglu_train_bench.log" | cut -c1-300
cp benchmarks/results/kernels-*-swiglu-train.json "$OUT/" 2>/dev/null
exit ${rc:-0}
