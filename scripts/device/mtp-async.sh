# MTP speculation at batch 1 and 16 (small preset, trained MTP): plain greedy, synchronous MTP
# steps and MTP steps under async scheduling (EngineConfig.async_scheduling_spec,
# engine/spec_overlap.py) in one `bench engine` run (mtp.<batch> and mtp.<batch>.async_spec),
# after their GPU tests (chain and async spec, fp32 graphs exact). CHAIN=1 runs the synchronous
# arm with MOERAY_FUSED_MTP_CHAIN=1 (tag suffix -chain); TESTS=0 skips the tests, TESTS_K picks
# them (pytest -k); BATCHES (default 1,16) and BENCH_ARGS pass to the bench (BENCH_ARGS="--temperature
# 1.0" adds the sampled arms: bench/mtp.py). 1 GPU, ~5 min.
rc=0
if [ "${TESTS:-1}" = 1 ]; then
  gpu_pytest mtp-async-tests.log ${TEST_LIMIT:-200} tests/gpu/test_engine_mtp_gpu.py \
    -k "${TESTS_K:-async_spec or chain}" || rc=1
fi
tag=small-mtpasync${CHAIN:+-chain}
CUDA_VISIBLE_DEVICES=0 MOERAY_FUSED_MTP_CHAIN=${CHAIN:-0} timeout -k 5 ${ENGINE_LIMIT:-300} \
  python3 -m moeray.cli bench engine --device cuda --skip hf,router-ab,prefill \
  --batch-sizes ${BATCHES:-1,16} ${BENCH_ARGS:-} --tag $tag --out-dir "$OUT" > "$OUT/engine-$tag.log" 2>&1
r=$?; [ $r -eq 0 ] || rc=1
el "bench engine $tag rc=$r"
python3 - "$OUT" "$tag" <<'PY'
import glob, json, sys
for f in glob.glob(f"{sys.argv[1]}/engine-*-{sys.argv[2]}.json"):
    d = json.load(open(f))
    print(f"{'batch':>5} {'plain':>9} {'mtp':>9} {'x':>6} {'acc':>5} {'same':>5} | {'ahead':>9} {'x':>6} {'acc':>5} {'same':>5} {'steps':>5}")
    for b, m in sorted(d["mtp"].items(), key=lambda kv: int(kv[0])):
        a = m.get("async_spec", {})
        print(f"{b:>5} {m['baseline_tokens_per_s']:9.0f} {m['tokens_per_s']:9.0f} {m['speedup']:6.3f} "
              f"{m['acceptance']:5.2f} {str(m['outputs_identical']):>5} | {a.get('tokens_per_s', 0):9.0f} "
              f"{a.get('speedup', 0):6.3f} {a.get('acceptance', 0):5.2f} {str(a.get('outputs_identical')):>5} "
              f"{a.get('overlapped_steps', 0):5d}")
        sm = m.get("sampled")
        if sm:  # BENCH_ARGS="--temperature T": the sampled arms
            print(f"{b:>5} sampled T={sm['temperature']}: plain {sm['baseline_tokens_per_s']:.0f}, "
                  f"mtp {sm['speedup']:.3f}x (acc {sm['acceptance']:.2f}), ahead "
                  f"{sm['async_spec_speedup']:.3f}x, ahead = mtp: {sm['async_spec_outputs_equal_sync']}")
PY
exit $rc
