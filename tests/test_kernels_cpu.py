"""The compiled CPU kernels (lens_kernels.cpu_ext) vs the float64 references, kernel by kernel.

Widths are not multiples of the 8-float vector, targets fall inside and outside the shard,
padded columns, −inf columns, masked rows holding garbage, temperatures ≠ 1, 16-bit inputs,
in-place gradients, and more rows than threads × the 4-row work unit (dynamic hand-out).
"""
from __future__ import annotations

import pytest
import torch

from lens_kernels import cpu_ext
from lens_kernels.reference import reference_row_grad, reference_row_stats
from lens_kernels.torch_stored import stored_scale
from seeds import random_seed

pytestmark = pytest.mark.skipif(
    __import__("lens_kernels.triton_logprob", fromlist=["x"]).is_interpreted(),
    reason="the interpreted-Triton subprocess runs only TestTritonInterpreted")


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(random_seed())


def _case(gen, rows=37, cols=301, dtype=torch.float32):
    logits = (torch.randn(rows, cols, generator=gen) * 3).to(dtype)
    logits[:, 5] = float("-inf")
    logits[3, :] = float("-inf")                      # an all −inf row, inactive
    targets = torch.randint(-40, cols + 120, (rows,), generator=gen)   # some outside the shard
    active = (torch.rand(rows, generator=gen) < 0.8).to(torch.int8)
    active[3] = 0
    logits[4] = float("nan")                          # garbage in another inactive row
    active[4] = 0
    return logits, targets, active


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("entropy", [False, True])
def test_row_stats_matches_reference(gen, dtype, entropy):
    logits, targets, active = _case(gen, dtype=dtype)
    got = cpu_ext.row_stats(logits.unsqueeze(0), targets, active, 60, 290, 1 / 0.8, entropy)
    want = reference_row_stats(logits, targets, active, 60, 290, 0.8)
    if not entropy:
        want[:, 3] = 0.0
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_row_stats_store_leaves_exp_in_the_buffer(gen, temperature):
    logits, targets, active = _case(gen, rows=70)
    buf = logits.clone()
    got = cpu_ext.row_stats(buf.unsqueeze(0), targets, active, 0, 290, 1 / temperature, True,
                            store=True)
    want = reference_row_stats(logits, targets, active, 0, 290, temperature)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)
    act = active.bool()
    x = logits[act, :290].double() / temperature
    torch.testing.assert_close(buf[act, :290].double(), torch.exp(x - x.amax(1, keepdim=True)),
                               atol=1e-6, rtol=1e-5)
    assert torch.equal(buf[:, 290:].nan_to_num(), logits[:, 290:].nan_to_num())   # padding untouched
    assert torch.equal(buf[~act].nan_to_num(), logits[~act].nan_to_num())   # inactive rows too


@pytest.mark.parametrize("dtype,tol", [(torch.float32, dict(atol=1e-6, rtol=1e-5)),
                                       (torch.bfloat16, dict(atol=1e-4, rtol=1e-2))])
@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_row_grad_matches_reference(gen, dtype, tol, entropy, inplace):
    logits, targets, active = _case(gen, dtype=dtype)
    act = active.bool()
    x = logits.float()[:, :290] / 0.7
    lse = torch.where(act, torch.logsumexp(x.nan_to_num(), -1), torch.zeros(()))
    coef = torch.randn(logits.shape[0], generator=gen) * act
    coef[6] = 0.0                                      # an active row with zero gradient
    ent = torch.randn(logits.shape[0], generator=gen) * act if entropy else None
    mean = torch.randn(logits.shape[0], generator=gen) if entropy else None
    if entropy:
        ent[6] = 0.0
    grad = logits.clone() if inplace else torch.full_like(logits, 7.0)
    cpu_ext.row_grad((grad if inplace else logits).unsqueeze(0), grad.unsqueeze(0), targets, lse,
                     coef, ent, mean, 60, 290, 1 / 0.7)
    want = reference_row_grad(logits.nan_to_num(), targets, lse, coef, ent, mean, 60, 290, 0.7)
    torch.testing.assert_close(grad.double(), want, **tol)
    assert (grad[~act] == 0).all() and (grad[6] == 0).all() and (grad[:, 290:] == 0).all()


@pytest.mark.parametrize("entropy", [False, True])
def test_row_grad_stored_matches_reference(gen, entropy):
    logits, targets, active = _case(gen, rows=41)
    act = active.bool()
    stored = logits.clone()
    stats = cpu_ext.row_stats(stored.unsqueeze(0), targets, active, 60, 290, 1 / 0.9, True,
                              store=True)
    x = logits[:, :290] / 0.9
    lse = torch.where(act, torch.logsumexp(x.nan_to_num(), -1), torch.zeros(()))
    scale = stored_scale(stats[:, 0], lse)
    shift = torch.where(torch.isfinite(stats[:, 0]), stats[:, 0], torch.zeros(()))
    coef = torch.randn(41, generator=gen) * act
    ent = torch.randn(41, generator=gen) * act if entropy else None
    mean = torch.randn(41, generator=gen) if entropy else None
    cpu_ext.row_grad_stored(stored.unsqueeze(0), targets, scale, shift, coef, ent, mean, 60, 290,
                            1 / 0.9)
    want = reference_row_grad(logits.nan_to_num(), targets, lse, coef, ent, mean, 60, 290, 0.9)
    torch.testing.assert_close(stored.double(), want, atol=1e-6, rtol=1e-5)
    assert (stored[~act] == 0).all()


def test_strided_batches_and_many_rows(gen):
    """[S, B, V] storage seen as [B, S, V] (rows that do not merge): one call per batch row."""
    storage = torch.randn(130, 3, 260, generator=gen) * 2
    logits = storage[..., :250].transpose(0, 1)          # [3, 130, 250], non-mergeable
    targets = torch.randint(0, 250, (390,), generator=gen)
    active = torch.ones(390, dtype=torch.int8)
    got = cpu_ext.row_stats(logits, targets, active, 0, 250, 1.0, True)
    want = reference_row_stats(logits.reshape(390, 250), targets, active, 0, 250)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)
    lse = torch.logsumexp(logits.reshape(390, 250), -1)
    coef = torch.randn(390, generator=gen)
    grad = torch.empty(3, 130, 250)
    cpu_ext.row_grad(logits, grad, targets, lse, coef, None, None, 0, 250, 1.0)
    want = reference_row_grad(logits.reshape(390, 250), targets, lse, coef, None, None, 0, 250)
    torch.testing.assert_close(grad.reshape(390, 250).double(), want, atol=1e-6, rtol=1e-5)
