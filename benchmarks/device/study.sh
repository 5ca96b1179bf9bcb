#!/usr/bin/env bash
# There, after setup.sh: the GPU fashion-det study (`reproduce ab --preset synth-scratch-gpu`), one process per
# seed side by side, each stopped after $1 seconds (default 400); then the runs are packed into $OUT/runs.tgz
# (last.pt only of unfinished runs). Unpack it here, carry benchmarks/results/fashion_det_scratch_gpu/runs to the
# next call and run this again: finished runs are read back, interrupted ones resume. When all 25 runs are done,
# the last process to finish writes ab.md / ab.csv and the plots, which are copied to $OUT.
out=benchmarks/results/fashion_det_scratch_gpu
budget=${1:-400}
for seed in 0 1 2 3 4; do
  timeout "$budget" python3 -m sos_detect.cli reproduce ab --preset synth-scratch-gpu --seeds "$seed" \
    --opt workers=3 --out "$out" >"$OUT/seed$seed.log" 2>&1 &
  sleep $([ "$seed" = 0 ] && echo 20 || echo 3) # the first writes the label caches alone; then staggered
done
wait
done_runs=$(ls "$out"/runs/*/done.json 2>/dev/null | wc -l)
echo "finished runs: $done_runs / 25"
if [ "$done_runs" = 25 ]; then
  python3 -m sos_detect.cli reproduce ab --preset synth-scratch-gpu --out "$out" >"$OUT/aggregate.log" 2>&1
  cp "$out"/ab* "$OUT"/
fi
find "$out/runs" -type f ! -name '*.pt' >/tmp/pack
for run in "$out"/runs/*/; do [ -f "$run/done.json" ] || ls "$run"weights/last.pt >>/tmp/pack 2>/dev/null; done
ls "$OUT"/seed*.log >>/tmp/pack; tar czf - -T /tmp/pack | split -b 15M - "$OUT/runs.tgz."; rm "$OUT"/seed*.log
