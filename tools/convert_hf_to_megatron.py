#!/usr/bin/env python
"""Hugging Face Llama-3.x / Qwen2.5 -> Megatron distributed checkpoint (+ lens_config.yaml).

    .venv/bin/python tools/convert_hf_to_megatron.py --hf-dir HF_DIR --out MEGATRON_DIR \\
        [--tp N --pp N --dtype bf16|fp32] [--report]

Details: lens_megatron/checkpoint/convert_cli.py and conversion.py.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lens_megatron.checkpoint.convert_cli import hf_to_megatron_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(hf_to_megatron_main())
