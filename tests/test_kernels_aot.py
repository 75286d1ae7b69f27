"""Every shipped Triton kernel configuration compiles for sm_90a (and sm_100a) without spills.

No GPU needed: ``triton.compile`` targets ``GPUTarget("cuda", arch, 32)`` on this CPU
machine and the ptxas inside Triton reports registers/spills (DESIGN §3).
"""
from __future__ import annotations

import os

import pytest

from lens_kernels import aot, triton_logprob

pytestmark = pytest.mark.skipif(triton_logprob.is_interpreted(),
                                reason="TRITON_INTERPRET=1 replaces the kernels with interpreters")

# sm_90a: every run-time specialisation; sm_100a: the default (32-bit strides, aligned) one.
_CASES = [(cfg, 90, var) for cfg in triton_logprob.KERNEL_CONFIGS for var in aot.VARIANTS] + \
         [(cfg, 100, aot.VARIANTS[0]) for cfg in triton_logprob.KERNEL_CONFIGS]


def _case_id(case):
    cfg, arch, var = case
    return (f"{cfg.kernel}-{str(cfg.dtype)[6:]}-b{cfg.block_v}-ent{int(cfg.with_entropy)}-"
            f"sm{arch}-{var.stride_type}{'-al16' if var.aligned else ''}")


def test_ptxas_is_shipped_with_triton():
    path = aot.ptxas_path()
    assert os.path.isfile(path) and os.access(path, os.X_OK), path


@pytest.mark.parametrize("case", _CASES, ids=_case_id)
def test_config_compiles_without_spills(case):
    cfg, arch, variant = case
    kernel, report = aot.compile_and_report(cfg, arch, variant)
    assert {"ptx", "cubin"} <= set(kernel.asm), sorted(kernel.asm)
    assert f".target sm_{arch}a" in kernel.asm["ptx"]
    assert len(kernel.asm["cubin"]) > 0
    assert report.arch == f"sm_{arch}a"
    assert report.name == ("row_stats_kernel" if cfg.kernel == "stats" else "row_grad_kernel")
    assert report.spill_stores == 0 and report.spill_loads == 0, report.text
    assert 0 < report.registers <= 255, report.text


def test_launcher_only_picks_compiled_configs():
    """select_config never returns a configuration that the AOT cases above do not compile."""
    import torch

    for kernel in ("stats", "grad"):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for ent in (False, True):
                assert triton_logprob.select_config(kernel, dtype, ent) in \
                    triton_logprob.KERNEL_CONFIGS
    with pytest.raises(ValueError):
        triton_logprob.select_config("stats", torch.float64, False)
