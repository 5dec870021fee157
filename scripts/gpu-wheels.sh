#!/usr/bin/env bash
# Download, here, the wheels the GPU machine needs for the test oracles (it has no network):
# cvxpy and its solvers, daqp and qpth, for its Python 3.12. They go to .whl/ (ignored by git:
# add '/.whl/' to .git/info/exclude), which `device` carries with carry=[".whl"].
set -euo pipefail
mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
for pkg in cvxpy==1.9.3 clarabel==0.11.1 scs==3.2.7 osqp==1.1.3 daqp==0.11.0 highspy qdldl 'sparsediffpy>=0.6,<0.7'; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "$pkg"
done
cp .wheels/qpth-*.whl .whl/  # built by scripts/build-qpth-wheel.sh
du -sh .whl
