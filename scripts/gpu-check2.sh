#!/usr/bin/env bash
# Second GPU call of a session: the CUDA tests, the CPU-vs-CUDA family check, and where the ALM's
# time goes at batch 4096 (benchmarks/profile_alm.py), float64 and float32. Logs to $OUT.
set -u
out=${OUT:-results}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1
timeout 120 python3 -m pytest -q -p no:cacheprovider -k cuda tests/test_forward.py tests/test_lpgd.py tests/test_bench.py 2>&1 \
  | tail -8 | tee "$out/cuda-tests.txt"
timeout 150 python3 scripts/cuda_check.py --out "$out" 2>&1 | tee "$out/cuda-check.txt" | tail -40
timeout 120 python3 -m benchmarks.profile_alm --device cuda --batch 4096 --out "$out" 2>&1 | tee "$out/profile-f64.txt" | head -60
