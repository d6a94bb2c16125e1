# One persistent launch for a decode layer's MLA attention (MOERAY_FUSED_MLA_BLOCK=1, opt-in;
# kernels/mla_block/) checked and timed (1 GPU, ~5 minutes): its GPU tests (against the engine's
# launches at Moonlight's and 128 heads, bf16 and FP8, 1-4 tokens, 1-1,024 cached; the input-norm
# stage; DeepSeek-V3 with its q LoRA; from a CUDA graph launched cooperatively and not), then
# `bench kernels --only mla_block` (the block against those launches from graphs, weights out of
# L2, and against its HBM floor, at Moonlight's and V3's attention). The engine A/B is
# recipe decode-ab (MLA_BLOCK first in its AB list); ENGINE=1 adds Moonlight bf16 at batch 1 and 4
# here (~3 more minutes). Run `persistent-probe` first: it says what an in-kernel wait costs
# against a kernel boundary. Make the block the default at decode (mla_decode_block_applies
# without the switch) where it wins.
gpu_pytest pytest_mla_block.log ${TEST_LIMIT:-240} tests/gpu/test_mla_block_gpu.py || rc=1
CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${BENCH_LIMIT:-180} python3 -m moeray.cli bench kernels \
  --only mla_block --tag mla-block > "$OUT/mla_block_bench.log" 2>&1 || rc=1
el "bench kernels mla_block rc=${rc:-0}"; grep "^mla_decode_block\|failed" "$OUT/mla_block_bench.log" | cut -c1-200
cp benchmarks/results/kernels-*-mla-block.json "$OUT/" 2>/dev/null
if [ "${ENGINE:-0}" = 1 ]; then
  ( export SHAPES=moonlight WEIGHTS=bf16 BATCHES=1,4 AB=MLA_BLOCK TAG_SUFFIX=-mlablock
    export PROFILE_STEPS=${PROFILE_STEPS:-2} SHAPES_LIMIT=${SHAPES_LIMIT:-240}
    source scripts/device/engine-shapes.sh ) || rc=1
  grep -A4 "^ab  " "$OUT"/engine-moonlight-bf16-mlablock.log 2>/dev/null | cut -c1-120
fi
exit ${rc:-0}
