# MTP with K drafts a step (num_speculative_tokens 2..4: the MTP module chained on its own hidden
# row; greedy steps run ahead under async scheduling as one whole-step graph of 1 + K tokens), in
# three parts, each off with its switch set to 0:
#   TESTS   the GPU tests: fp32 exact against plain decoding at K = 2 and 3, the one-draft
#           whole-step graphs, whose code K > 1 generalized, and the opt-in sampled whole-step
#           graphs at 1 and 3 drafts (TESTS_K picks them; ~4 min)
#   BENCH   one `bench engine` run of the small preset's trained MTP at BATCHES (default 1,16)
#           with --mtp-drafts DRAFTS (default 2,3): plain, one draft synchronous and ahead, K
#           drafts (mtp.<batch>.drafts.<K>, acceptance by position; ~4-5 min). DECODE_TOKENS
#           (64) timed a sequence: 16-32 steps an arm, where 32 gave 8-17 and one slow step
#           moved an arm by a few percent
#   CYCLES  the batch-1 cycle of 1 and each K drafts, random weights
#           (scripts/mtp_cycle_profile.py --drafts: GPU time, kernels, host launch; ~1 min each),
#           again for each K with each opt-in set of CYCLE_SWITCHES on (space-separated sets of
#           comma-joined names, e.g. "MOE_GEMV_FEW MOE_GEMV_FEW,MLA_WUK_SPLIT_WIDE": the few-token
#           rules at 3-4 tokens a row); all of it in $OUT/cycles.tar.gz
# 1 GPU, ~10 min in all: past one call's 600 s, so run TESTS=1 BENCH=0 CYCLES=0 first, then
# TESTS=0 (bench and cycles).
rc=0
if [ "${TESTS:-1}" = 1 ]; then
  gpu_pytest mtp-drafts-tests.log ${TEST_LIMIT:-300} tests/gpu/test_engine_mtp_gpu.py \
    -k "${TESTS_K:-drafts_k or spec_graph_fp32_exact or async_spec_graphs or spec_graph_sampled}" || rc=1
fi
tag=small-mtpdrafts
if [ "${BENCH:-1}" = 1 ]; then
CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${ENGINE_LIMIT:-360} \
  python3 -m moeray.cli bench engine --device cuda --skip hf,router-ab,prefill \
  --batch-sizes ${BATCHES:-1,16} --mtp-drafts ${DRAFTS:-2,3} --decode-tokens ${DECODE_TOKENS:-64} \
  --tag $tag --out-dir "$OUT" \
  > "$OUT/engine-$tag.log" 2>&1
r=$?; [ $r -eq 0 ] || rc=1
el "bench engine $tag rc=$r"
python3 - "$OUT" "$tag" <<'PY'
import glob, json, sys
for f in glob.glob(f"{sys.argv[1]}/engine-*-{sys.argv[2]}.json"):
    d = json.load(open(f))
    print(f"{'batch':>5} {'arm':>12} {'tok/s':>9} {'x plain':>8} {'acc':>5} {'len':>5} {'same':>5} {'graphs':>6}")
    for b, m in sorted(d["mtp"].items(), key=lambda kv: int(kv[0])):
        arms = [("plain", None), ("1 sync", m), ("1 ahead", m.get("async_spec", {}))]
        arms += [(f"{k} drafts", r) for k, r in sorted(m.get("drafts", {}).items())]
        for name, r in arms:
            if r is None:
                print(f"{b:>5} {name:>12} {m['baseline_tokens_per_s']:9.0f}")
                continue
            print(f"{b:>5} {name:>12} {r.get('tokens_per_s', 0):9.0f} {r.get('speedup', 0):8.3f} "
                  f"{r.get('acceptance', 0):5.2f} {r.get('mean_accepted_length', 0):5.2f} "
                  f"{str(r.get('outputs_identical')):>5} {str(r.get('spec_graph_steps')):>6}")
PY
fi
if [ "${CYCLES:-1}" = 1 ]; then
  # one arm a switch set: "default" and each CYCLE_SWITCHES entry (comma-joined MOERAY_FUSED_
  # names set to 1), every draft count; logs and JSONs go back as one tarball (8 files return)
  mkdir -p "$OUT/cycles"
  for set in default ${CYCLE_SWITCHES:-}; do
    sw=(); [ "$set" = default ] || for n in ${set//,/ }; do sw+=("MOERAY_FUSED_$n=1"); done
    for k in 1 ${DRAFTS//,/ }; do
      [ "$set" = default ] || [ "$k" != 1 ] || continue  # (one draft: 2 tokens, no rule changes)
      mkdir -p "$OUT/cycles/$set"
      env "${sw[@]}" CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${CYCLE_LIMIT:-150} \
        python3 scripts/mtp_cycle_profile.py --preset ${PRESET:-small} --batch 1 --drafts $k \
        --out "$OUT/cycles/$set" > "$OUT/cycles/$set/k$k.log" 2>&1 || rc=1
      el "mtp cycle batch 1, $k drafts, $set"
      grep -A3 "^arm" "$OUT/cycles/$set/k$k.log"
    done
  done
  tar czf "$OUT/cycles.tar.gz" -C "$OUT" cycles && rm -rf "$OUT/cycles"
fi
exit $rc
