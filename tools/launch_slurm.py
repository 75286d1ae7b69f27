#!/usr/bin/env python
"""Write (and with --submit, submit) an sbatch script for lens-train; see docs/slurm.md.

Thin wrapper over ``lens_megatron.launch.slurm.main`` (also installed as ``lens-launch``).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lens_megatron.launch.slurm import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
