#!/usr/bin/env python
"""lens-megatron checkpoint -> Hugging Face directory (safetensors, config.json, tokenizer).

    .venv/bin/python tools/convert_megatron_to_hf.py --megatron-dir MEGATRON_DIR --out HF_DIR \\
        [--dtype bf16|fp32] [--max-shard-size 2GiB] [--report]

Details: lens_megatron/checkpoint/convert_cli.py and conversion.py.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lens_megatron.checkpoint.convert_cli import megatron_to_hf_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(megatron_to_hf_main())
