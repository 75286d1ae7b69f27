#!/usr/bin/env python
"""Write a random Hugging Face Llama/Qwen2 model (safetensors + config.json) of a given size.

Memory stays at about one shard: tensors are generated and written one at a time.

    .venv/bin/python tools/make_random_hf_model.py --out /tmp/llama-1b --preset llama-1b
    .venv/bin/python tools/make_random_hf_model.py --out /tmp/tiny --family qwen2 --hidden 64 \\
        --layers 2 --ffn 128 --heads 4 --kv-heads 2 --vocab 300 --tie
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lens_megatron.checkpoint.hf_files import parse_size  # noqa: E402
from lens_megatron.checkpoint.random_hf_model import write_random_hf_model  # noqa: E402
from lens_megatron.models.arch import ModelArch, RopeScaling  # noqa: E402

PRESETS = {
    # 1.10B parameters, the TinyLlama-1.1B shape: hidden 2048, 22 layers, ffn 5632,
    # 32 query / 4 KV heads, vocab 32000, untied embeddings (plus Llama-3 RoPE settings).
    "llama-1b": dict(family="llama", hidden_size=2048, num_layers=22, ffn_hidden_size=5632,
                     num_attention_heads=32, num_query_groups=4, vocab_size=32000,
                     rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5,
                     rope_scaling=RopeScaling()),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    parser.add_argument("--family", choices=("llama", "qwen2"), default="llama")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--ffn", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=300)
    parser.add_argument("--tie", action="store_true", help="tie input and output embeddings")
    parser.add_argument("--llama3-rope-scaling", action="store_true")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-shard-size", default="2GiB")
    return parser.parse_args(argv)


def arch_from_args(args: argparse.Namespace) -> ModelArch:
    if args.preset:
        return ModelArch(**PRESETS[args.preset])
    return ModelArch(
        family=args.family, vocab_size=args.vocab, hidden_size=args.hidden,
        ffn_hidden_size=args.ffn, num_layers=args.layers, num_attention_heads=args.heads,
        num_query_groups=args.kv_heads, qkv_bias=args.family == "qwen2",
        tie_word_embeddings=args.tie,
        rope_scaling=RopeScaling() if args.llama3_rope_scaling else None)


def main(argv=None) -> int:
    args = parse_args(argv)
    arch = arch_from_args(args)
    out = write_random_hf_model(args.out, arch, args.dtype, args.seed,
                                parse_size(args.max_shard_size))
    print(f"wrote {out}: {arch.family}, {arch.num_parameters() / 1e9:.3f}B parameters, "
          f"{args.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
