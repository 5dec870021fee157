"""Forward-pass timings of alqp against ProxSuite's QPLayer, qpth and cvxpylayers.

Runs the ``forward`` preset of ``alqp.bench`` (random QPs n=100, p=50, m=50 at batch 1, 100 and
1000, and n=50, p=10, m=50 at batch 128; forward only), prints the table and writes
``results/forward.json`` and ``results/forward.png`` (another folder with --out DIR).
Every option of ``alqp --help`` is accepted, e.g. ``python benchmarks/forward.py --threads 1 --quick``.
"""
import sys

from alqp.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["--preset", "forward", *sys.argv[1:]], as_program=True))
