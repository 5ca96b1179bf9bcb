#!/usr/bin/env bash
# There, after setup.sh: the GPU fashion-det study (`reproduce ab --preset synth-scratch-gpu`), one process per
# seed side by side, each stopped after $1 seconds (default 400; leave the setup's ≈ 60 s, the 32 s of staggered
# starts and ≈ 20 s of packing inside the call's 600 s). The runs are then packed into $OUT/runs.tgz.* (15 MB parts,
# last.pt only of unfinished runs) with the processes' logs. A call made while the machine is still warm continues
# there; otherwise unpack the parts here and carry benchmarks/results/fashion_det_scratch_gpu/runs to the next call.
# Finished runs are read back, interrupted ones resume. Once all 25 runs are done, a last process over all seeds
# writes ab.md / ab.csv and the plots (each per-seed process writes a one-seed table that this one replaces), and
# they are copied to $OUT.
set -u
: "${OUT:?OUT must name the folder whose files come back}"
out=benchmarks/results/fashion_det_scratch_gpu
budget=${1:-400}
mkdir -p "$out/logs"
for seed in 0 1 2 3 4; do
  timeout "$budget" python3 -m sos_detect.cli reproduce ab --preset synth-scratch-gpu --seeds "$seed" \
    --opt workers=3 --out "$out" >"$out/logs/seed$seed.log" 2>&1 &
  # the first process writes the label caches and the subset lists alone; the others start after it, staggered
  [ "$seed" = 4 ] || sleep $([ "$seed" = 0 ] && echo 20 || echo 4)
done
wait
done_runs=$(ls "$out"/runs/*/done.json 2>/dev/null | wc -l)
echo "finished runs: $done_runs / 25"
if [ "$done_runs" = 25 ]; then
  python3 -m sos_detect.cli reproduce ab --preset synth-scratch-gpu --out "$out" >"$out/logs/aggregate.log" 2>&1
  cp "$out"/ab* "$OUT"/
fi
{
  find "$out/runs" "$out/logs" -type f ! -name '*.pt'
  for run in "$out"/runs/*/; do [ -f "$run/done.json" ] || ls "$run"weights/last.pt 2>/dev/null; done
} >/tmp/pack
set -o pipefail
tar czf - -T /tmp/pack | split -b 15M - "$OUT/runs.tgz." || echo "packing failed: the runs stay on the machine"
