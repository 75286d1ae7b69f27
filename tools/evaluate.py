#!/usr/bin/env python
"""pass@k evaluation (same as the ``lens-eval`` entry point); see lens_megatron/eval/cli.py."""
import sys

from lens_megatron.eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
