#!/usr/bin/env python
"""Throughput benchmark (same as the ``lens-bench`` entry point); see
``lens_megatron/bench/throughput.py`` for what is measured and how."""
import sys

from lens_megatron.bench.throughput import main

if __name__ == "__main__":
    sys.exit(main())
