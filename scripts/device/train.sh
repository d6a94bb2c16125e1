# `moeray bench train`: small(), PP=2 x EP=2 DualPipe with the overlap thread, BF16 and FP8 (the
# grouped FP8 experts; PER_EXPERT=1 for the per-expert GEMMs), tokens/s, bubble, loss gap, each
# rank's thread dump on a hang (MOERAY_STACKS_DIR), PROFILE=1 profiles the last step. 4 GPUs,
# ~8 minutes.
mkdir -p /tmp/stacks /tmp/results /tmp/prof
MOERAY_STACKS_DIR=/tmp/stacks MOERAY_DIST_TIMEOUT_S=$([ -n "${PROFILE:-}" ] && echo 300 || echo 60) \
  timeout -k 5 ${TRAIN_LIMIT:-480} python3 -m moeray.cli bench train \
  --model small --device cuda --pp 2 --ep ${EP:-2} --seq-len 1024 --micro-batch-size 2 --microbatches 8 \
  --steps ${STEPS:-20} --warmup 3 --lr ${LR:-1e-3} --overlap --out /tmp/results \
  ${PROFILE:+--profile /tmp/prof} ${PER_EXPERT:+--no-grouped-fp8} > "$OUT/train.log" 2>&1
rc=$?; el "bench train rc=$rc"
find /tmp/stacks -empty -delete; tar czf "$OUT/stacks-profiles.tgz" -C /tmp stacks prof
cp /tmp/results/train-*.json "$OUT/" 2>/dev/null
grep "bench train\]" "$OUT/train.log" | grep "done\|failed" | cut -c1-300
grep -v "^\s*$" "$OUT/train.log" | grep -v "UserWarning\|return Variable\|step [0-9]*/" | tail -14
exit $rc
