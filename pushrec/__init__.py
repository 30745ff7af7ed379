"""pushrec: the command line and its benchmarks."""

import os

# One BLAS thread: the products here are small (55k x 16), and on a 2-core machine shared with
# the event loop and the broker, OpenBLAS's spinning worker threads made a 9k x 256 product 20x
# slower (12 ms against 0.6 ms, measured). Set before numpy is first imported; an explicit
# environment setting wins.
for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")
