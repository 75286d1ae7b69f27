"""Vocab-parallel (TP) log-probs: gloo ranks vs one process, and the single-collective merge."""
from __future__ import annotations


import pytest
import torch
import torch.distributed as dist

from lens_kernels import logprobs_and_confidence
from lens_kernels import tp
from lens_kernels.reference import reference_row_stats
from seeds import random_seed

# Everything torch.distributed can communicate with; the count below includes them all.
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single",
                "_all_gather_base", "reduce_scatter", "reduce_scatter_tensor", "all_to_all",
                "all_to_all_single", "broadcast", "reduce", "gather", "scatter", "barrier",
                "all_gather_object", "broadcast_object_list", "send", "recv", "isend", "irecv",
                "batch_isend_irecv", "all_reduce_coalesced")

# (dtype, temperature, entropy) computed on every rank of one spawn
_CASES = [("float32", 0.8, True), ("bfloat16", 1.0, False)]


def _case_inputs(seed, padded_vocab, dtype_name):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 5, padded_vocab, generator=gen) * 3
    logits = logits.to(getattr(torch, dtype_name))
    mask = torch.rand(3, 5, generator=gen) < 0.7
    mask[2] = False
    weights = [torch.randn(3, 5, generator=gen), torch.randn(3, generator=gen),
               torch.randn(3, generator=gen) * 1e3, torch.randn(3, 5, generator=gen)]
    return logits, mask, weights


def _run_case(logits_shard, targets, mask, weights, group, valid_vocab, temperature, entropy):
    """Forward + backward of one case; returns every output and the shard's gradient."""
    x = logits_shard.clone().requires_grad_(True)
    out = logprobs_and_confidence(x, targets, mask, group, valid_vocab=valid_vocab,
                                  temperature=temperature, return_entropy=entropy)
    loss = (out.token_logprobs * weights[0]).sum() + (out.logprob_sum * weights[1]).sum()
    loss = loss + (out.confidence * weights[2]).sum()
    if entropy:
        loss = loss + (out.entropy * weights[3]).sum()
    loss.backward()
    result = {k: getattr(out, k).detach() for k in
              ("token_logprobs", "logprob_sum", "num_tokens", "confidence")}
    result["entropy"] = out.entropy.detach() if entropy else None
    result["grad"] = x.grad
    return result


def _count_collectives():
    """Wrap every collective in torch.distributed; returns the list the calls are logged in."""
    calls: list[str] = []
    depth = [0]

    def wrap(name, fn):
        def counted(*args, **kwargs):
            if depth[0] == 0:      # count outermost calls only (one API may call another)
                calls.append(name)
            depth[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
        return counted

    for name in _COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, wrap(name, getattr(dist, name)))
    return calls


def _tp_rank(seed, padded_vocab, valid_vocab):
    """One gloo rank: its vocab shard of each case, with the collectives of each call counted."""
    world, rank = dist.get_world_size(), dist.get_rank()
    calls = _count_collectives()
    v_local = padded_vocab // world
    results = []
    for i, (dtype_name, temperature, entropy) in enumerate(_CASES):
        logits, mask, weights = _case_inputs(seed + i, padded_vocab, dtype_name)
        targets = torch.randint(0, valid_vocab, mask.shape, generator=torch.Generator().manual_seed(seed))
        shard = logits[..., rank * v_local:(rank + 1) * v_local]
        before = len(calls)
        res = _run_case(shard, targets, mask, weights, dist.group.WORLD, valid_vocab,
                        temperature, entropy)
        res["collectives"] = calls[before:]
        results.append(res)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("world,padded_vocab,valid_vocab", [
    (2, 1024, 1000),   # padding on the last rank only
    (4, 1024, 700),    # rank 2 partly padding, rank 3 entirely padding (no valid column)
])
def test_tp_equals_single_process(world, padded_vocab, valid_vocab):
    from lens_megatron.parallel.spawn import run_in_processes

    seed = random_seed()
    per_rank = run_in_processes(_tp_rank, world, args=(seed, padded_vocab, valid_vocab),
                                timeout=240.0)
    for i, (dtype_name, temperature, entropy) in enumerate(_CASES):
        logits, mask, weights = _case_inputs(seed + i, padded_vocab, dtype_name)
        targets = torch.randint(0, valid_vocab, mask.shape, generator=torch.Generator().manual_seed(seed))
        want = _run_case(logits, targets, mask, weights, None, valid_vocab, temperature, entropy)
        for rank, got in enumerate(rank_results[i] for rank_results in per_rank):
            assert got["collectives"] == [got["collectives"][0]], got["collectives"]
            assert got["collectives"][0] in ("all_gather_single", "all_gather_into_tensor")
            for key in ("token_logprobs", "logprob_sum", "confidence", "entropy"):
                if want[key] is not None:
                    torch.testing.assert_close(got[key], want[key], atol=2e-5, rtol=1e-5,
                                               msg=lambda m: f"rank {rank} {key}: {m}")
            assert torch.equal(got["num_tokens"], want["num_tokens"])
        grad = torch.cat([r[i]["grad"] for r in per_rank], dim=-1)
        # TP changes the summation order of lse (ulp-level), and the 1e3-weighted confidence
        # term amplifies it; bf16 gradients may land one ulp apart
        tol = dict(atol=1e-4, rtol=1e-4) if dtype_name == "float32" else dict(atol=1e-4, rtol=1.6e-2)
        torch.testing.assert_close(grad.float(), want["grad"].float(), **tol)
        assert (grad[..., valid_vocab:] == 0).all()


@pytest.mark.parametrize("split", ["empty-first", "empty-middle-and-last", "random"])
def test_merge_of_shards_equals_unsharded_stats(split):
    """merge_row_stats over any vocab split (empty shards, −inf columns) = the full-vocab row."""
    seed = random_seed()
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 4, 97, generator=gen, dtype=torch.float64) * 4
    logits[0, 0, :60] = float("-inf")                     # first shards of this row empty-ish
    logits[..., 5] = float("-inf")
    targets = torch.randint(0, 97, (2, 4), generator=gen)
    active = torch.ones(8, dtype=torch.int8)
    if split == "empty-first":
        cuts = [0, 31, 31]
    elif split == "empty-middle-and-last":
        cuts = [31, 31, 97]
    else:
        cuts = sorted(torch.randint(0, 98, (3,), generator=gen).tolist())
    bounds = [0, *cuts, 97]
    shards = [reference_row_stats(logits[..., a:b], targets, active, a, b - a)
              for a, b in zip(bounds[:-1], bounds[1:])]
    merged = tp.merge_row_stats(torch.stack(shards))
    x = logits.reshape(8, 97)
    logp = torch.log_softmax(x, -1)
    p = logp.exp()
    mean = (torch.where(p > 0, p * x, torch.zeros_like(p))).sum(-1)
    msg = f"seed={seed} cuts={cuts}"
    torch.testing.assert_close(merged.lse, torch.logsumexp(x, -1), msg=msg)
    torch.testing.assert_close(merged.target_logit, x.gather(1, targets.reshape(8, 1)).squeeze(1),
                               msg=msg)
    torch.testing.assert_close(merged.mean_logit, mean, msg=msg)
    torch.testing.assert_close(merged.entropy, torch.logsumexp(x, -1) - mean, msg=msg)


def test_size_one_group_is_the_local_path(monkeypatch):
    """No group (or a size-1 group) communicates nothing: the TP code path is the local one."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a collective was issued without tensor parallelism")

    for name in _COLLECTIVES:
        if hasattr(dist, name):
            monkeypatch.setattr(dist, name, forbidden)
    stats = torch.randn(6, tp.STATS_WIDTH)
    assert torch.equal(tp.gather_row_stats(stats, None)[0], stats)
    logits = torch.randn(2, 3, 40)
    out = logprobs_and_confidence(logits.requires_grad_(True), torch.zeros(2, 3, dtype=torch.long),
                                  torch.ones(2, 3))
    out.confidence.sum().backward()
    assert logits.grad is not None
