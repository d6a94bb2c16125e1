# `train-graphs`: one-GPU training with each micro-batch replayed from a CUDA graph
# (moeray/platform/train/graphs.py): its GPU test against eager training, then `moeray bench train
# --pp 1` at Moonlight widths (as train-1gpu.sh): FP8 for every projection with BF16 weight
# gradients, graphed and not, against BF16 graphed and not; then FP8 for the routed experts only,
# graphed -> $OUT/train-1gpu-<gpu>-graphs-{all,experts}$TAG.json. 1 GPU, ~9 min. Overrides:
# LAYERS (auto), STEPS (8), LR (1e-3), SEEDS (1: --seeds, each run from that many seeds), SEED (0), SCOPES
# ("all experts"; mlp too), RUNS_ALL, RUNS_EXPERTS (any scope but all), LIMIT (300 s a bench),
# TAG (file suffix), SKIP_TESTS=1; RUNS: one bench of these runs instead of the SCOPES loop
# (scope all where a run names none: fp8-bf16wgrad-graphs@mlp; -> ...-graphs-all$TAG.json);
# the loss bar: SCOPES=all RUNS_ALL=bf16-graphs,fp8-bf16wgrad-graphs STEPS=80 SEEDS=2 LR=4.2e-4;
# EXTRA_TESTS: more test files for the same pytest run (tests/gpu/test_train_job_gpu.py needs
# the Ray bundle: carry .gpu-bundle).
rc=0
if [ -z "${SKIP_TESTS:-}" ]; then
  [ -n "${EXTRA_TESTS:-}" ] && use_bundle
  gpu_pytest train-graphs-tests.log 300 tests/gpu/test_train_graphs_gpu.py ${EXTRA_TESTS:-} || rc=1
fi
bench() {  # bench SCOPE RUNS LIMIT
  mkdir -p /tmp/results-$1
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True CUDA_VISIBLE_DEVICES=0 \
    timeout -k 5 $3 python3 -m moeray.cli bench train --device cuda --pp 1 --ep 1 \
    --model moonlight_16b_a3b --layers ${LAYERS:-auto} --seq-len 4096 --micro-batch-size 2 \
    --microbatches 4 --steps ${STEPS:-8} --warmup 3 --lr ${LR:-1e-3} --seeds ${SEEDS:-1} --seed ${SEED:-0} \
    --moments-dtype bfloat16 \
    --fp8-scope $1 --runs $2 --out /tmp/results-$1 > "$OUT/train-graphs-$1.log" 2>&1
  local r=$?; el "bench train scope=$1 runs=$2 rc=$r"
  for f in /tmp/results-$1/train-1gpu-*.json; do
    [ -f "$f" ] && cp "$f" "$OUT/$(basename "$f" .json)-graphs-$1${TAG:-}.json"
  done
  grep "layers auto\|out of memory\|failed\|Error" "$OUT/train-graphs-$1.log" | cut -c1-300 | tail -8
  python3 - "$OUT" "$1${TAG:-}" <<'PY'
import glob, json, sys
for f in glob.glob(f"{sys.argv[1]}/train-1gpu-*-graphs-{sys.argv[2]}.json"):
    d = json.load(open(f))
    print(f"{'run':28} {'step s':>7} {'vs':>6} {'gpu s':>6} {'kernels':>7} {'peak GiB':>8} {'loss':>8} {'dloss':>7}")
    for n, r in d["runs"].items():
        g = r.get("gpu_time_s_per_step") or 0
        print(f"{n:28} {r['step_time_s']:7.3f} {r.get('step_time_vs_bf16') or 1:6.3f} {g:6.3f} "
              f"{r.get('gpu_kernels_per_step') or 0:7} {(r.get('peak_memory_bytes') or 0)/2**30:8.1f} "
              f"{r['final_loss']:8.4f} {100*(r.get('loss_rel_diff_vs_bf16') or 0):6.3f}%")
        tail = {k: v for k, v in r.items() if k.startswith("loss_rel_diff_vs_bf16_mean_last")}
        if tail:
            print(f"  vs {r['vs_run']}: " + ", ".join(
                f"{k.removeprefix('loss_rel_diff_vs_bf16_')} {v if isinstance(v, dict) else 100 * v}"
                for k, v in tail.items()))
    print("layers", d["layers"], "seeds", d.get("seeds"), "failed", d["failed_runs"])
PY
  return $r
}
if [ -n "${RUNS:-}" ]; then
  bench all "$RUNS" ${LIMIT:-600} || rc=1
  exit $rc
fi
for scope in ${SCOPES:-all experts}; do
  if [ "$scope" = all ]; then runs=${RUNS_ALL:-bf16,bf16-graphs,fp8-bf16wgrad,fp8-bf16wgrad-graphs}
  else runs=${RUNS_EXPERTS:-bf16,fp8-bf16wgrad-graphs}; fi
  bench $scope $runs ${LIMIT:-300} || rc=1
done
exit $rc
