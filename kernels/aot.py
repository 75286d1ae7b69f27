"""Ahead-of-time compile of the shipped Triton kernels for NVIDIA targets, on a CPU machine.

DESIGN §3: ``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda",
90, 32))`` produces PTX and a cubin for sm_90a without a GPU, and the ``ptxas`` shipped
inside Triton (``ptxas-blackwell`` for sm_90+) reports registers and spill bytes. CI uses
this to prove every launch configuration (:data:`triton_logprob.KERNEL_CONFIGS`) compiles
for the H100 (and sm_100a) without spilling.

Each configuration is compiled in the variants Triton's JIT can specialise to at run time:
32- and 64-bit strides (a ``[32768, 128256]`` tensor needs 64-bit), with and without the
16-byte alignment attributes. Command line: ``python -m lens_kernels.aot [--arch 90 100]``.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import triton_logprob as tk

_STATS_ARGS = ["logits_ptr", "targets_ptr", "active_ptr", "stats_ptr", "seq_len", "stride_b",
               "stride_s", "n_valid", "vocab_start", "inv_temperature"]
_GRAD_ARGS = ["logits_ptr", "grad_ptr", "targets_ptr", "lse_ptr", "coef_ptr", "ent_coef_ptr",
              "mean_ptr", "seq_len", "stride_b", "stride_s", "grad_stride_b", "grad_stride_s",
              "n_valid", "n_cols", "vocab_start", "inv_temperature"]


@dataclass(frozen=True)
class Variant:
    """Run-time specialisation of one configuration: stride width and pointer alignment."""

    stride_type: str   # "i32" or "i64"
    aligned: bool      # pointers (and strides) divisible by 16, as the JIT marks them


VARIANTS = (Variant("i32", True), Variant("i64", True), Variant("i32", False),
            Variant("i64", False))


@dataclass
class PtxasReport:
    """What ``ptxas -v`` says about one compiled kernel."""

    name: str
    arch: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    text: str


def _arg_types(cfg: tk.KernelConfig, variant: Variant) -> dict[str, str]:
    elem = tk.triton_dtype_name(cfg.dtype)
    if cfg.kernel == "stats":
        pointers = {"logits_ptr": f"*{elem}", "targets_ptr": "*i64", "active_ptr": "*i8",
                    "stats_ptr": "*fp32"}
        names = _STATS_ARGS
    else:
        pointers = {"logits_ptr": f"*{elem}", "grad_ptr": f"*{elem}", "targets_ptr": "*i64",
                    **{n: "*fp32" for n in ("lse_ptr", "coef_ptr", "ent_coef_ptr", "mean_ptr")}}
        names = _GRAD_ARGS
    types = {}
    for name in names:
        if name in pointers:
            types[name] = pointers[name]
        elif "stride" in name:
            types[name] = variant.stride_type
        else:
            types[name] = "fp32" if name == "inv_temperature" else "i32"
    return types


def compile_config(cfg: tk.KernelConfig, arch: int = 90, variant: Variant = VARIANTS[0]):
    """``triton.compile`` one configuration for ``sm_{arch}a``; returns the compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = tk.row_stats_kernel if cfg.kernel == "stats" else tk.row_grad_kernel
    signature = _arg_types(cfg, variant)
    signature.update(BLOCK_V="constexpr", WITH_ENTROPY="constexpr")
    attrs = {}
    if variant.aligned:
        for i, (name, ty) in enumerate(signature.items()):
            if ty.startswith("*") or "stride" in name:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, attrs=attrs,
                    constexprs={"BLOCK_V": cfg.block_v, "WITH_ENTROPY": cfg.with_entropy})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": cfg.num_warps, "enable_fp_fusion": True})


def ptxas_path() -> str:
    """The ptxas inside the installed Triton that handles sm_90+ (``ptxas-blackwell`` in 3.9)."""
    from triton import knobs

    return knobs.nvidia.ptxas_blackwell.path


def ptxas_report(ptx: str, arch: int = 90) -> PtxasReport:
    """Assemble ``ptx`` with ``ptxas -v --gpu-name sm_{arch}a`` and parse its resource line."""
    gpu = f"sm_{arch}a"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([ptxas_path(), "-v", "--gpu-name", gpu, str(src), "-o",
                               str(Path(tmp) / "k.cubin")], capture_output=True, text=True,
                              check=True)
    text = proc.stdout + proc.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      text)
    name = re.search(r"Compiling entry function '(\w+)'", text)
    if not (regs and spill and name):
        raise RuntimeError(f"could not parse ptxas output:\n{text}")
    return PtxasReport(name.group(1), gpu, int(regs.group(1)), int(spill.group(2)),
                       int(spill.group(3)), int(spill.group(1)), text)


def compile_and_report(cfg: tk.KernelConfig, arch: int = 90, variant: Variant = VARIANTS[0]):
    """Compile one configuration and run ptxas on its PTX → (compiled kernel, report)."""
    kernel = compile_config(cfg, arch, variant)
    return kernel, ptxas_report(kernel.asm["ptx"], arch)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 100])
    args = parser.parse_args(argv)
    print(f"{'kernel':6} {'dtype':9} {'block':>5} {'warps':>5} {'ent':>5} {'variant':12} "
          f"{'arch':8} {'regs':>4} {'spill':>5}")
    for arch in args.arch:
        for cfg in tk.KERNEL_CONFIGS:
            for var in VARIANTS:
                _, rep = compile_and_report(cfg, arch, var)
                tag = f"{var.stride_type}{'/al16' if var.aligned else ''}"
                print(f"{cfg.kernel:6} {str(cfg.dtype)[6:]:9} {cfg.block_v:5d} {cfg.num_warps:5d} "
                      f"{str(cfg.with_entropy):>5} {tag:12} {rep.arch:8} {rep.registers:4d} "
                      f"{rep.spill_stores + rep.spill_loads:5d}")


if __name__ == "__main__":
    main()
