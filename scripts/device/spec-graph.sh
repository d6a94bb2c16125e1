# MTP steps under async scheduling as one CUDA graph each (engine/spec_step.py SpecGraph): the MTP
# GPU tests (TESTS=0 skips them; TESTS_K picks them), then scripts/mtp_cycle_profile.py with
# MOERAY_FUSED_SPEC_GRAPH off and on at BATCHES (default 1 16): wall, host launch, GPU busy and
# kernels per greedy cycle. SAMPLED=1 instead times the opt-in sampled graphs
# (MOERAY_FUSED_SPEC_GRAPH_SAMPLED off, then on): the cycle at batch 1 (TEMP, default 1.0, TOP_P
# 0.9), then `bench engine` at --temperature TEMP (its mtp.<batch>.sampled arms, the MTP section
# only; DRAFTS=2,3 adds the sampled arms of that many drafts a step). 1 GPU, ~3 min (SAMPLED=1:
# ~6 min, ~9 with DRAFTS).
rc=0
if [ "${TESTS:-1}" = 1 ]; then
  gpu_pytest spec-graph-tests.log ${TEST_LIMIT:-300} tests/gpu/test_engine_mtp_gpu.py \
    -k "${TESTS_K:-spec_graph or async_spec}" || rc=1
fi
if [ "${SAMPLED:-0}" = 1 ]; then
  for g in 0 1; do  # the cycle first (seconds), then the bench
    mkdir -p "$OUT/spec-sampled$g"
    CUDA_VISIBLE_DEVICES=0 MOERAY_FUSED_SPEC_GRAPH_SAMPLED=$g timeout -k 5 ${CYCLE_LIMIT:-150} \
      python3 scripts/mtp_cycle_profile.py --preset ${PRESET:-small} --batch 1 \
      --temperature ${TEMP:-1.0} --top-p ${TOP_P:-0.9} --out "$OUT/spec-sampled$g" \
      > "$OUT/spec_sampled${g}_b1.log" 2>&1 || rc=1
    el "sampled mtp cycle batch 1 SPEC_GRAPH_SAMPLED=$g"
    grep -A3 "^arm" "$OUT/spec_sampled${g}_b1.log"
  done
  for g in 0 1; do
    tag=small-specsampled$g
    CUDA_VISIBLE_DEVICES=0 MOERAY_FUSED_SPEC_GRAPH_SAMPLED=$g timeout -k 5 ${ENGINE_LIMIT:-240} \
      python3 -m moeray.cli bench engine --device cuda --skip hf,router-ab,prefill \
      --batch-sizes ${BATCHES_CSV:-1,16} --temperature ${TEMP:-1.0} --tag $tag \
      ${DRAFTS:+--mtp-drafts $DRAFTS} --out-dir "$OUT" > "$OUT/engine-$tag.log" 2>&1 || rc=1
    el "bench engine SPEC_GRAPH_SAMPLED=$g"
    python3 - "$OUT" "$tag" <<'PY'
import glob, json, sys
for f in glob.glob(f"{sys.argv[1]}/engine-*-{sys.argv[2]}.json"):
    for b, m in sorted(json.load(open(f))["mtp"].items(), key=lambda kv: int(kv[0])):
        s = m.get("sampled", {})
        print(f"batch {b}: sampled plain {s.get('baseline_tokens_per_s', 0):.0f} tok/s")
        for k, r in [("1", s)] + sorted(s.get("drafts", {}).items()):
            print(f"  {k} drafts: async MTP {r.get('async_spec_speedup', 0):.3f}x, "
                  f"whole-step steps {r.get('async_spec_graph_steps')}, "
                  f"= synchronous MTP: {r.get('async_spec_outputs_equal_sync')}")
PY
  done
  exit $rc
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
