# Where a decode step's time goes (scripts/engine_step_profile.py): the model call against the
# rest of the step, then a profile, at batch 1 and 16. 1 GPU, ~3 minutes.
for b in ${BATCHES:-1 16}; do
  mkdir -p "$OUT/b$b"
  timeout -k 5 200 python3 scripts/engine_step_profile.py --preset small --batch "$b" --out "$OUT/b$b" \
    > "$OUT/engine_step_b$b.log" 2>&1 || rc=1
  el "engine step profile batch $b"; tail -25 "$OUT/engine_step_b$b.log" | cut -c1-200
done
exit ${rc:-0}
