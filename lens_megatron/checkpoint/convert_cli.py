"""Command lines of the two conversions (``tools/convert_hf_to_megatron.py`` and
``tools/convert_megatron_to_hf.py`` call these).

    convert_hf_to_megatron.py --hf-dir HF_DIR --out MEGATRON_DIR [--tp N --pp N --dtype bf16|fp32]
    convert_megatron_to_hf.py --megatron-dir MEGATRON_DIR --out HF_DIR [--dtype ...]
        [--arch-config lens_config.yaml]  # for checkpoints without lens_checkpoint.json

``--report`` prints wall time, peak resident memory (``getrusage`` high-water marks of this
process and of its children, and the RSS before converting), the largest shard written and
the ratio peak RSS / largest shard.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
import warnings
from typing import Callable, Optional, Sequence

from .conversion import ConversionResult, convert_hf_to_megatron, convert_megatron_to_hf
from .hf_files import HFCheckpointError, parse_size
from .hf_mapping import UnsupportedModelError
from .model_io import CheckpointError

# Errors whose message is the whole story: printed without a traceback.
USER_ERRORS = (HFCheckpointError, UnsupportedModelError, CheckpointError, FileExistsError,
               ValueError, KeyError)


def hf_to_megatron_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert a Hugging Face Llama-3.x / Qwen2.5 model into a Megatron "
                    "distributed checkpoint (loadable at any TP/PP) plus lens_config.yaml.")
    parser.add_argument("--hf-dir", required=True, help="HF model directory (safetensors)")
    parser.add_argument("--out", required=True, help="new Megatron checkpoint directory")
    parser.add_argument("--tp", type=int, default=1,
                        help="tensor-parallel size the trainer will use (validated, written "
                             "to lens_config.yaml; the checkpoint itself loads at any TP)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size, likewise")
    parser.add_argument("--dtype", choices=("auto", "bf16", "fp32", "fp16"), default="auto",
                        help="parameter dtype of the checkpoint (auto: the HF model's)")
    _add_common_flags(parser)
    return parser


def megatron_to_hf_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert a lens-megatron checkpoint back into a Hugging Face directory "
                    "(safetensors shards + index, config.json, tokenizer files).")
    parser.add_argument("--megatron-dir", required=True, help="Megatron checkpoint directory")
    parser.add_argument("--out", required=True, help="new HF model directory")
    parser.add_argument("--dtype", choices=("bf16", "fp32", "fp16"), default=None,
                        help="dtype of the HF weights (default: the checkpoint's)")
    parser.add_argument("--max-shard-size", default="2GiB",
                        help="largest safetensors file, e.g. 500MB, 2GiB (default 2GiB)")
    parser.add_argument("--arch-config", default=None,
                        help="trainer YAML whose model.arch describes the model, for "
                             "checkpoints without lens_checkpoint.json (training checkpoints)")
    _add_common_flags(parser)
    return parser


def _add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--report", action="store_true",
                        help="print wall time, peak RSS and largest shard when done")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def current_rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> tuple[int, int]:
    """High-water resident memory of this process and of its (waited-for) children."""
    kib = 1024  # Linux reports ru_maxrss in KiB
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib,
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kib)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def format_report(result: ConversionResult, wall_s: float, rss_before: int,
                  shard_kind: str) -> tuple[str, dict]:
    """Human-readable report and the same numbers as a dict."""
    own, children = peak_rss_bytes()
    peak = max(own, children)
    numbers = {"wall_s": wall_s, "peak_rss_bytes": peak, "peak_rss_self_bytes": own,
               "peak_rss_children_bytes": children, "rss_before_bytes": rss_before,
               "model_bytes": result.total_bytes,
               "largest_shard_bytes": result.largest_shard_bytes,
               "peak_rss_over_largest_shard": peak / max(1, result.largest_shard_bytes)}
    text = "\n".join([
        f"output:              {result.output_dir}",
        f"wall time:           {wall_s:.1f} s",
        f"peak RSS:            {_gib(peak)} (this process {_gib(own)}, children "
        f"{_gib(children)}; {_gib(rss_before)} before converting)",
        f"model size:          {_gib(result.total_bytes)} ({result.dtype}, "
        f"{result.arch.num_parameters() / 1e9:.2f}B parameters)",
        f"largest shard:       {_gib(result.largest_shard_bytes)} ({shard_kind})",
        f"peak RSS / largest shard: {numbers['peak_rss_over_largest_shard']:.2f}",
        f"peak RSS / model size:    {peak / max(1, result.total_bytes):.2f}",
    ])
    return text, numbers


def _quiet_library_warnings() -> None:
    """megatron-core warns at import about optional fused kernels a conversion never uses."""
    for pattern in (".*Apex.*", ".*Transformer Engine.*", ".*load_state_dict.*deprecated.*",
                    ".*cuda_graph_scope.*"):
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=FutureWarning)


def _run(convert: Callable[[], ConversionResult], report: bool, shard_kind: str) -> int:
    _quiet_library_warnings()
    import megatron.core  # noqa: F401 - imported before the baseline RSS is taken

    rss_before = current_rss_bytes()
    start = time.perf_counter()
    try:
        result = convert()
    except USER_ERRORS as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {message}", file=sys.stderr)
        return 1
    if report:
        print(format_report(result, time.perf_counter() - start, rss_before, shard_kind)[0])
    else:
        print(f"wrote {result.output_dir}")
    return 0


def hf_to_megatron_main(argv: Optional[Sequence[str]] = None) -> int:
    args = hf_to_megatron_parser().parse_args(argv)
    return _run(lambda: convert_hf_to_megatron(args.hf_dir, args.out, args.tp, args.pp,
                                               args.dtype, progress=not args.no_progress),
                args.report, "one tensor shard of the Megatron checkpoint")


def megatron_to_hf_main(argv: Optional[Sequence[str]] = None) -> int:
    args = megatron_to_hf_parser().parse_args(argv)
    return _run(lambda: convert_megatron_to_hf(args.megatron_dir, args.out, args.dtype,
                                               parse_size(args.max_shard_size),
                                               progress=not args.no_progress,
                                               arch_config=args.arch_config),
                args.report, "one safetensors file")
