# The FP8 GEMM tile sweep (scripts/fp8_gemm_sweep.py) against the shipped kernel at V3 shapes, and
# the registers and CTAs per SM of the shipped tiles (scripts/gemm_registers.py). 1 GPU, ~3 minutes.
timeout -k 5 ${SWEEP_LIMIT:-200} python3 scripts/fp8_gemm_sweep.py --variants ${VARIANTS:-prod,ptr64x128s3} \
  --budget 150 --json "$OUT/fp8_gemm_sweep.json" > "$OUT/sweep.log" 2>&1
rc=$?; el "sweep rc=$rc"; sed -n '/^FINAL/,$p' "$OUT/sweep.log" | cut -c1-160
timeout -k 5 60 python3 scripts/gemm_registers.py > "$OUT/registers.log" 2>&1; el "registers rc=$?"
tail -8 "$OUT/registers.log"
exit $rc
