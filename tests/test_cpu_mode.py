"""One test per CPU-mode patch, so a megatron-core upgrade that breaks one is obvious.

Run in a fresh process each (the patches are global to the process).
"""
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU mode is only enabled without a GPU")


def run_snippet(code: str) -> str:
    prelude = "from lens_megatron.parallel import cpu_mode\nassert cpu_mode.enable()\n"
    result = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_current_device_and_synchronize():
    run_snippet("""
        import torch
        assert torch.zeros(1, device=torch.cuda.current_device()).device.type == "cpu"
        torch.cuda.synchronize()
        torch.cuda.current_stream().wait_stream(torch.cuda.default_stream())
    """)


def test_cuda_allocations_map_to_cpu_inside_the_mode_only():
    run_snippet("""
        import torch
        with cpu_mode.cuda_to_cpu():
            for t in (torch.zeros(2, device="cuda"), torch.empty(3, device=torch.device("cuda:0")),
                      torch.ones(1, device=torch.cuda.current_device()),
                      torch.tensor([1.0]).cuda(), torch.tensor([1.0]).to("cuda"),
                      torch.arange(3, device="cuda"), torch.zeros(1).new_zeros(2, device="cuda")):
                assert t.device.type == "cpu", t.device
        try:
            torch.zeros(1, device="cuda")
        except (RuntimeError, AssertionError, AttributeError):
            pass
        else:
            raise SystemExit("the mapping leaked outside cuda_to_cpu()")
    """)


def test_tensor_type_reports_cuda_names():
    run_snippet("""
        import torch
        assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
        assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
        assert torch.zeros(1).type(torch.float64).dtype == torch.float64
    """)


def test_rng_tracker_forks_on_cpu_generators():
    run_snippet("""
        import torch
        from megatron.core.tensor_parallel import random as tp_random
        tracker = tp_random.get_cuda_rng_tracker()
        tracker.reset()
        tracker.add("a", 11)
        torch.manual_seed(0)
        outside_before = torch.rand(1)
        torch.manual_seed(0)
        with tracker.fork("a"):
            first = torch.rand(1)
        outside_after = torch.rand(1)
        assert torch.equal(outside_before, outside_after), "fork leaked into the default stream"
        tracker.reset(); tracker.add("a", 11)
        with tracker.fork("a"):
            assert torch.equal(torch.rand(1), first), "the forked stream is not deterministic"
    """)


def test_enable_is_idempotent_and_reports_state():
    out = run_snippet("print(cpu_mode.enable(), cpu_mode.is_enabled())")
    assert out.strip() == "True True"


def test_schedules_allocate_on_cpu_outside_the_mode_and_torch_is_untouched():
    """Patch 6: the schedules' literal ``device="cuda"`` maps to CPU without the per-op mode
    (the actor runs the schedule outside it); ``torch`` itself still refuses CUDA."""
    run_snippet("""
        import torch
        from megatron.core.pipeline_parallel import schedules
        t = schedules.torch.zeros([], dtype=torch.int, device="cuda")
        assert t.device.type == "cpu" and t.dtype == torch.int
        assert schedules.torch.float32 is torch.float32 and schedules.torch.no_grad is torch.no_grad
        try:
            torch.zeros(1, device="cuda")
        except (RuntimeError, AssertionError, AttributeError):
            pass
        else:
            raise SystemExit("patch 6 leaked into torch itself")
        cpu_mode.enable()
        assert isinstance(schedules.torch, cpu_mode._TorchWithCpuFactories)
        assert not isinstance(schedules.torch._torch, cpu_mode._TorchWithCpuFactories)
    """)
