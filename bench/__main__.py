"""`python -m bench`: run every benchmark scenario and write the table, JSON and chart."""

import sys

from bench.cli import main

# Guarded: multiprocessing's spawn start method imports this module again in every worker.
if __name__ == "__main__":
    sys.exit(main())
