#!/usr/bin/env bash
# There, after setup.sh: the GPU fashion-det study (`reproduce ab --preset synth-scratch-gpu`), five runs side by
# side on the one GPU (`--jobs 5`: each its own process, pinned to 3–4 of the 16 cores), stopped after $1 seconds
# (default 400; leave the setup's ≈ 60 s and ≈ 20 s of packing inside the call's 600 s). What the harness cannot do
# itself is all that is left here: the time limit, and packing the runs into $OUT/runs.tgz.* (15 MB parts, last.pt
# only of unfinished runs) with their logs. A call made while the machine is still warm continues there; otherwise
# unpack the parts here and carry benchmarks/results/fashion_det_scratch_gpu/runs to the next call. Finished runs
# are read back, interrupted ones resume; once all 25 are done the same command writes ab.md / ab.csv and the
# plots, copied to $OUT.
set -u
: "${OUT:?OUT must name the folder whose files come back}"
out=benchmarks/results/fashion_det_scratch_gpu
mkdir -p "$out/logs"
# timeout signals the harness's whole process group: its workers stop with it and resume at the next call
timeout "${1:-400}" python3 -m sos_detect.cli reproduce ab --preset synth-scratch-gpu --jobs 5 --opt workers=3 \
  --out "$out" >"$out/logs/study.log" 2>&1
done_runs=$(ls "$out"/runs/*/done.json 2>/dev/null | wc -l)
echo "finished runs: $done_runs / 25"
[ "$done_runs" = 25 ] && cp "$out"/ab* "$OUT"/
{
  find "$out/runs" "$out/logs" -type f ! -name '*.pt'
  for run in "$out"/runs/*/; do [ -f "$run/done.json" ] || ls "$run"weights/last.pt 2>/dev/null; done
} >/tmp/pack
set -o pipefail
tar czf - -T /tmp/pack | split -b 15M - "$OUT/runs.tgz." || echo "packing failed: the runs stay on the machine"
