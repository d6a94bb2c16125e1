# `moeray bench kernels`, every section (quant, fp8 GEMM, grouped FP8 GEMM, fused MoE, MLA decode
# eager and under graphs, MLA prefill, MoE gate) against its baseline and the hardware ceiling;
# the JSON carries the flat `results` records with their targets. 1 GPU, ~6 minutes.
CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${KERNELS_LIMIT:-540} python3 -m moeray.cli bench kernels ${ONLY:+--only $ONLY --tag ${TAG:-partial}} > "$OUT/kernels.log" 2>&1
rc=$?; el "bench kernels rc=$rc"
sed -n '/^issue 4 targets/,$p' "$OUT/kernels.log" | cut -c1-170
cp "$(ls -t benchmarks/results/kernels-*.json | head -1)" "$OUT/" 2>/dev/null
exit $rc
