"""Forward + backward timings of alqp against ProxSuite's QPLayer, qpth and cvxpylayers.

Runs the ``backward`` preset of ``alqp.bench`` (random QPs n=100, p=50, m=50 at batch 1, 100 and
1000, and n=50, p=10, m=50 at batch 128; forward, then the gradient of a random linear loss of x
with respect to all of H, g, A, b, C, l, u), prints the table and writes ``results/backward.json``
and ``results/backward.png`` (another folder with --out DIR). alqp's backward rows are skipped, with
the reason, until alqp provides a differentiable layer. Every option of ``alqp --help`` is accepted.
"""
import sys

from alqp.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["--preset", "backward", *sys.argv[1:]], as_program=True))
