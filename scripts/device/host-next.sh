# Host time around decode graphs and PDL, in one call (1 GPU, ~6 minutes): the graph-launch probe
# (scripts/graph_launch_probe.py: host time of a replay by kernel nodes, plain and PDL), then the
# engine shapes at every batch with PDL on and off in the same call (TAG_SUFFIX -pdlon / -pdloff):
# whether PDL still pays past batch 1, where it no longer does on the Moonlight shape
# (benchmarks/notes-engine.md), with each run's decode_graph_ms and host phases.
PYTHONPATH=. CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${PROBE_LIMIT:-60} python3 scripts/graph_launch_probe.py \
  --out "$OUT" > "$OUT/graph_launch_probe.log" 2>&1 || rc=1
el "graph_launch_probe"; tail -12 "$OUT/graph_launch_probe.log"
for pdl in 1 0; do
  tag=$([ $pdl = 1 ] && echo -pdlon || echo -pdloff)
  ( export MOERAY_FUSED_PDL=$pdl TAG_SUFFIX=$tag PROFILE_STEPS=${PROFILE_STEPS:-2}
    source scripts/device/engine-shapes.sh ) || rc=1
done
exit ${rc:-0}
