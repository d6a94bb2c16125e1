# Does one persistent kernel beat kernel boundaries on a chain of decode GEMVs? (1 GPU, <1 minute):
# scripts/pdl_probe.py at N = 2048 (8.4 MB weights a GEMV, Moonlight's o_proj) and 1024 (2.1 MB):
# one launch per GEMV plain / PDL / PDL with the weights read before the wait, against the whole
# chain in one cooperative launch whose programs wait on per-layer counters (tile and prefetch
# variants, counters polled with atomics or loads). On an H200 it does not: every persistent row
# is slower than one launch a GEMV (benchmarks/notes-engine.md).
for n in 2048 1024; do
  PYTHONPATH=. CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${PROBE_LIMIT:-90} python3 scripts/pdl_probe.py \
    --n $n --out "$OUT" > "$OUT/pdl_probe_n$n.log" 2>&1 || rc=1
  el "pdl_probe --n $n"; tail -12 "$OUT/pdl_probe_n$n.log"
done
exit ${rc:-0}
