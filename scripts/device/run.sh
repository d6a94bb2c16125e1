#!/usr/bin/env bash
# One runner for the GPU recipes in this folder: each recipe measures one thing and leaves its
# logs and result JSONs in $OUT. Runs the recipes in order and prints a table (recipe, exit status,
# seconds) last.
#
#   scripts/device/run.sh gpu-tests kernels          # from the repository root, on the device
#
# Recipes (scripts/device/<name>.sh; the header of each says what it needs: GPUs, carry):
#   gpu-tests          tests/gpu and the compiled kernel checks (1 GPU; GPU_PART / KERNEL_PART=k/n)
#   kernels            `moeray bench kernels`, every section (1 GPU)
#   fp8-gemm-sweep     the FP8 GEMM tile sweep against the shipped kernel, registers per tile (1 GPU)
#   fp8-gemv           fp8_gemv GPU tests + its bench table at V3 decode shapes (1 GPU, ~3 min)
#   head-gemv          head_gemv GPU tests, bench vs einsum, Moonlight engine A/B with MOERAY_FUSED_HEAD_GEMV=1 (1 GPU, ~5 min)
#   moe-decode-sweep   fused MoE block configs at decode token counts, weights out of L2 (1 GPU, ~2 min)
#   moe-gemv-down      moe_gemv's down launch over its own tiles (whole MoE, Moonlight/V3, 1-2 tokens) (1 GPU, ~3 min)
#   moe-gemv           moe_gemv GPU tests, sweep vs the aligned MoE at 1-2 tokens (1 GPU, ~6 min; engine A/B in the recipe)
#   gemv               gemv GPU tests (+ fp8_gemv's), bench tables, a tile sweep; Moonlight/V3 shapes (1 GPU)
#   gemv-sweep         the bf16 gemv tile sweep with 1-2 warp split-K tiles, 150 s budget (1 GPU, ~3 min)
#   grouped-wgrad      grouped_wgrad (BF16 experts' weight grads) GPU check + bench vs torch, tile sweep (1 GPU, ~3 min)
#   cross-entropy      fused cross-entropy GPU tests (loss, grads, memory at V 163,840) + bench vs torch (1 GPU, ~2 min)
#   adamw              fused AdamW (bf16/fp32 moments) GPU check + bench vs torch fused AdamW and the loop (1 GPU, ~3 min)
#   rope-train         training RoPE (autograd) compiled checks + bench vs autograd through rope_ref (1 GPU, ~2 min)
#   moe-permute        training MoE permute/combine (autograd) compiled check + bench vs Experts._routed's torch ops (1 GPU, ~2 min)
#   swiglu-train       training SwiGLU fwd/bwd (+ FP8 quant) compiled check + bench vs torch ops + act_quant (1 GPU, ~5 min)
#   engine             `moeray bench engine` (graphs, MTP, HF baseline) (1 GPU)
#   engine-profile     where a decode step's time goes at batch 1 and 16 (1 GPU)
#   engine-shapes      `moeray bench engine` at Moonlight and V3-width shapes, bf16 and FP8 (1 GPU)
#   decode-next        moe_align GPU test, decode_glue, MLA short-context sweep (1 GPU)
#   b1-breakdown       MLA short-context sweep, batch-1 engine runs with PDL off (honest per-kernel times), host split (1 GPU, ~6 min)
#   async-ab           async scheduling: GPU tests, engine shapes with and without it (1 GPU, ~7 min)
#   decode-check       engine + fp8_gemv GPU tests, engine shapes as shipped, fp8_gemv at V3 shapes (1 GPU, ~9 min)
#   decode-defaults    engine GPU tests (async default), fp8_gemv batch-1 split sweep, engine shapes PDL off (1 GPU, ~8 min)
#   async-prefill      async scheduling through admissions (opt-in): async GPU tests, `bench engine --arrivals` off vs on at Moonlight (1 GPU, ~4 min)
#   async-sampled      async scheduling for sampled requests: GPU tests, engine shapes at temperature 1 without/with (1 GPU, ~6 min)
#   host-next          graph-launch probe (host time by kernel nodes, PDL), engine shapes with PDL on and off (1 GPU, ~6 min)
#   mla-wgmma          MLA decode's wgmma split kernels (WS the default): GPU tests, 128-head graphs vs the Triton kernel (1 GPU, ~2 min)
#   mla-wide           MLA's 64-row block rule: wgmma GPU tests, 128-head graphs incl. 2,560-page tables, V3 FP8 b8/b16 A/B MLA_WIDE (1 GPU, ~7 min)
#   decode-rules       mla-wgmma's rows at 1-64 sequences, head_gemv vs bmm at 32/64 rows, async GPU tests, V3 FP8 b64 after 2K prompts (1 GPU, ~7 min)
#   prefill-mla        fused MoE + MLA decode GPU tests, fused MoE prefill tile sweep vs the loop, MLA decode graphs (1 GPU, ~5 min)
#   moe-sum-fold       moe_gemv's sum folded into down (now the default): GPU tests, Moonlight b1/b8 without/with (1 GPU, ~6 min)
#   fp8-small-m        opt-in FP8_GEMV_BATCH (fp8_gemv to 64 rows): GPU test, FP8 linears at 64 rows: candidate sweep; Moonlight FP8 b64 A/B (1 GPU, ~7 min)
#   opt-in-tests       the GPU tests of every opt-in decode fast path (routing, MLA decode, FP8 gemv batch, head_gemv, argmax, shared early) (1 GPU, ~7 min)
#   decode-ab          `bench engine --ab`: each opt-in fast path flipped alone in one run, Moonlight b1/b64, WEIGHTS=bf16|fp8 (1 GPU, ~5 min)
#   step-glue          PAGED_POSITIONS, MLA_SUBPAGE (half pages by rule), NORM_W_EARLY: GPU tests, decode_glue row, Moonlight FP8 A/B at 128 and 2K prompts (1 GPU, ~7 min)
#   norm-router        post-attention norm folded into the router (default): GPU tests, Moonlight bf16/FP8 b1/b8 and V3 FP8 A/B (1 GPU, ~4 min)
#   moe-launches       ALIGN_QUANT, SHARED_SUM, NORM_ROUTER_WIDE (default), MOE_H128 (opt-in): GPU tests, Moonlight FP8 b32/b64 A/B, alone and together (1 GPU, ~3 min at BATCHES=64)
#   chunk-graphs       prefill chunks replayed from CUDA graphs: engine GPU tests with them on (CHUNK_REST=1: all), `bench engine --arrivals` graphs vs eager at Moonlight (1 GPU, ~5 min)
#   batch1-ab          the batch-1 opt-in switches (wide GEMV steps, moe_gemv down early, W_UV in the merge, W_UK in the write): A/B at Moonlight, B1_WEIGHTS="fp8 bf16", their GPU tests (1 GPU, ~2 min + GPU_LIMIT)
#   shared-stream      the shared experts on a second stream: GPU tests, `bench engine --ab SHARED_STREAM` (1 GPU, ~6 min)
#   argmax             greedy's argmax in one launch (opt-in): GPU test, decode_glue bench rows, V3/Moonlight A/B (1 GPU, ~4 min)
#   persistent-probe   one persistent kernel vs a launch per GEMV on a chain of decode GEMVs (pdl_probe.py, N 2048/1024) (1 GPU, <1 min)
#   long-prefill       4K-token prefill, expanded vs absorbed MLA, Moonlight and V3 widths (1 GPU)
#   mtp-async        MTP at batch 1/16 (small preset): plain, synchronous MTP, MTP under async scheduling; their GPU tests (1 GPU, ~5 min; CHAIN=1)
#   mtp-cycle          an MTP cycle under async scheduling vs a plain step: wall, host launch/resolve/wait, GPU busy (1 GPU, ~3 min)
#   spec-graph         MTP steps as one CUDA graph (SPEC_GRAPH): GPU tests, mtp cycle off/on at b1/b16; SAMPLED=1: sampled graphs A/B (1 GPU, ~3-5 min)
#   mtp-drafts         MTP with 2-3 drafts a step (chained MTP, whole-step graphs): GPU tests, `bench engine --mtp-drafts` at b1/b16, b1 cycles (1 GPU, ~10 min: two calls, TESTS / BENCH / CYCLES)
#   decode-sources     kernels per eager decode step by the moeray line that launched them (1 GPU)
#   wide-ep            EP GPU tests (decode graphs at ep=1) + `bench wide-ep --gpus 1` vs plain (1 GPU)
#   wide-ep-v3         DeepSeek-V3 (61 layers, FP8) at ep=8, then 8 layers over 1-8 GPUs (8 GPUs)
#   kv-serve           KV transports between two actors, P/D vs colocated Serve (2 GPUs, carry .gpu-bundle)
#   train              `moeray bench train` PP=2 x EP=2 DualPipe, BF16 and FP8 (4 GPUs)
#   train-1gpu         `moeray bench train --pp 1` Moonlight widths, BF16 vs FP8, eager and graphed (1 GPU, ~6 min)
#   train-profile      a one-GPU training step's kernels by launching source line (1 GPU, ~3 min)
#   train-graphs       one-GPU training replayed from CUDA graphs: GPU test + bench, FP8 experts/all (1 GPU, ~9 min)
set -u
cd "$(dirname "$0")/../.."
source scripts/device/env.sh
[ $# -gt 0 ] || { sed -n '2,64p' "$0"; exit 2; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "gpus", torch.cuda.device_count())'
declare -a rows
status=0
for name in "$@"; do
  recipe=scripts/device/$name.sh
  [ -f "$recipe" ] || { echo "unknown recipe '$name': choose from $(ls scripts/device | grep -v 'run.sh\|env.sh' | sed 's/\.sh$//' | tr '\n' ' ')"; exit 2; }
  start=$(date +%s); el "== $name"
  ( source "$recipe" ); rc=$?
  rows+=("$(printf '%-16s %4s %6s' "$name" "$rc" "$(( $(date +%s) - start ))")")
  [ $rc -eq 0 ] || status=1
done
# Only the first 8 files under $OUT come back from the device: past that, the logs go into one
# archive (result JSONs stay apart).
if [ "$(ls "$OUT" | wc -l)" -gt 8 ]; then
  (cd "$OUT" && ls | grep -v '\.json$\|\.tar\.gz$' | tar czf "logs-$(date +%s).tar.gz" -T - --remove-files)
fi
echo; printf '%-16s %4s %6s\n' recipe rc seconds; printf '%s\n' "${rows[@]}"
exit $status
