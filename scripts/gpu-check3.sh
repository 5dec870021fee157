#!/usr/bin/env bash
# Third GPU call: the scaling preset on CUDA at this stop's final code, and the profile of batch 4096
# at the preset's tolerance (absolute 1e-6) next to the default one. Logs to $OUT.
set -u
out=${OUT:-results}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1
timeout 60 python3 -m benchmarks.profile_alm --device cuda --batch 4096 --eps-abs 1e-6 --out "$out" 2>&1 | head -3
timeout 60 python3 -m benchmarks.profile_alm --device cuda --batch 4096 --out "$out" 2>&1 | head -3
timeout 200 python -m benchmarks --preset scaling --device cuda --peers alqp --ref-max 32 --out "$out" --no-plot \
  2>&1 | tee "$out/scaling-cuda.txt" | tail -22
