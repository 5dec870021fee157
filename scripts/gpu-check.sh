#!/usr/bin/env bash
# The GPU checks, run on the device machine (see README, "GPU"): the CUDA tests, the CPU-vs-CUDA
# check of every oracle family (scripts/cuda_check.py) and the scaling preset on CUDA.
# Needs the test oracles' wheels in .whl/ (cvxpy and its solvers, daqp, qpth): that machine has no
# network: scripts/gpu-wheels.sh fetches them here. Writes its logs and JSON to $OUT (default results/).
set -u
out=${OUT:-results}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$out/gpu.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider -k cuda tests/test_forward.py tests/test_lpgd.py tests/test_bench.py 2>&1 \
  | tail -25 | tee "$out/cuda-tests.txt"
timeout 200 python3 scripts/cuda_check.py --out "$out" 2>&1 | tee "$out/cuda-check.txt" | tail -70
timeout 240 python -m benchmarks --preset scaling --device cuda --peers alqp --ref-max 32 --out "$out" --no-plot \
  2>&1 | tee "$out/scaling-cuda.txt" | tail -40
