# `moeray bench train --pp 1`: one GPU, the Moonlight-16B-A3B shape with as many decoder layers as
# fit (--layers auto prints what it picked and why), from the same weights on the same batches:
# by default 2 x 4096 tokens per micro-batch x 4 (32,768 tokens a step, DeepSeek-V3's per-GPU
# share), bf16 AdamW moments, and the runs BF16 and FP8 for the routed experts with BF16 weight
# gradients, each eager and replayed from CUDA graphs: tokens/s, MFU (datasheet peak and a
# measured bf16 GEMM), GPU kernels per step, peak memory, the FP8 vs BF16 loss gap ->
# $OUT/train-1gpu-<gpu>.json (rewritten after each run). Then tests/gpu/test_train_one_gpu.py,
# test_train_graphs_gpu.py and the k-grouped GEMM's compiled check. 1 GPU, ~4 minutes. Overrides: LAYERS, SEQ, MBS (default 2), MICRO (4), STEPS,
# MOMENTS (bfloat16; float32), FP8_SCOPE (experts; all: every projection, DeepSeek-V3's recipe),
# RUNS (default bf16,bf16-graphs,fp8-bf16wgrad,fp8-bf16wgrad-graphs; names in
# bench_common.RUN_NAMES, each with -graphs or not), SKIP_TESTS=1.
mkdir -p /tmp/results
# expandable segments: one process, no NCCL; the step's large, changing allocations fragment less
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True CUDA_VISIBLE_DEVICES=0 \
  timeout -k 5 ${TRAIN_LIMIT:-420} python3 -m moeray.cli bench train --device cuda --pp 1 --ep 1 \
  --model moonlight_16b_a3b --layers ${LAYERS:-auto} --seq-len ${SEQ:-4096} \
  --micro-batch-size ${MBS:-2} --microbatches ${MICRO:-4} --steps ${STEPS:-10} --warmup 3 \
  --lr 1e-3 --moments-dtype ${MOMENTS:-bfloat16} \
  --fp8-scope ${FP8_SCOPE:-experts} \
  --runs ${RUNS:-bf16,bf16-graphs,fp8-bf16wgrad,fp8-bf16wgrad-graphs} \
  --out /tmp/results > "$OUT/train-1gpu.log" 2>&1
rc=$?; el "bench train --pp 1 rc=$rc"
cp /tmp/results/train-1gpu-*.json "$OUT/" 2>/dev/null
grep "layers auto\|out of memory\|matmul rate\|failed" "$OUT/train-1gpu.log" | cut -c1-400
grep -v "^\s*$" "$OUT/train-1gpu.log" | grep -v "UserWarning\|warnings.warn\|step [0-9]*/" | tail -30
if [ -z "${SKIP_TESTS:-}" ]; then
  gpu_pytest train-1gpu-tests.log 200 tests/gpu/test_train_one_gpu.py tests/gpu/test_train_graphs_gpu.py || rc=1
  gpu_pytest train-1gpu-kgrouped.log 150 tests/kernels/test_fp8_kgrouped.py -k gpu || rc=1
fi
exit $rc
