"""Time per-document causal attention over one packed row, forward + backward, on this machine.

Candidates (all exact, checked against a float64 per-document reference before timing):
  segments  one SDPA call per document, is_causal=True
  bucketed  documents sorted by length, cut into buckets by the cost model, each bucket one
            right-padded batched SDPA call (what method="auto" runs)
  padded    every document in ONE right-padded batch (bucketed with a single bucket)
  dense     one SDPA call with a [T, T] block-diagonal causal mask
  flex      FlexAttention with a document block mask (reports why it cannot run on CPU)
  nested    jagged nested tensors with is_causal (reports why it cannot run)

    python tools/bench_packed_attention.py                      # the default grid, a table
    python tools/bench_packed_attention.py --tokens 4096 --heads 16 --groups 4 \
        --workload longtail --methods segments bucketed         # one cell

Workloads: ``longtail`` lognormal document lengths (sigma 1, median T/16) filling T;
``short`` many documents of 16-96 tokens; ``equal`` T/8-token documents. Times are the
median and the minimum of ``--repeat`` runs after ``--warmup`` runs, and the median
round-by-round ratio to the first of ``--methods`` (robust on a busy machine), with
``torch.set_num_threads(--threads)``.
"""
from __future__ import annotations

import argparse
import math
import random
import statistics
import time

import torch
import torch.nn.functional as F

from lens_megatron.models.packed_attention import packed_causal_attention, plan_buckets

WORKLOADS = ("longtail", "short", "equal")
METHODS = ("segments", "bucketed", "padded", "dense", "flex", "nested")


def document_lengths(workload: str, tokens: int, seed: int = 0) -> list[int]:
    """Lengths summing to exactly ``tokens``."""
    rng = random.Random(seed)
    out: list[int] = []
    while sum(out) < tokens:
        if workload == "longtail":
            n = int(rng.lognormvariate(math.log(tokens / 16), 1.0))
        elif workload == "short":
            n = rng.randint(16, 96)
        elif workload == "equal":
            n = tokens // 8
        else:
            raise ValueError(f"workload must be one of {WORKLOADS}")
        out.append(max(1, min(n, tokens - sum(out))))
    return out


def reference(q, k, v, starts, lengths):
    """float64 per-document causal attention with repeated K/V; zeros outside documents."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    rep = q.shape[1] // k.shape[1]
    for s, n in zip(starts, lengths):
        qs = q[s:s + n].double().transpose(0, 1)
        ks = k[s:s + n].double().repeat_interleave(rep, 1).transpose(0, 1)
        vs = v[s:s + n].double().repeat_interleave(rep, 1).transpose(0, 1)
        scores = qs @ ks.transpose(-1, -2) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        out[s:s + n] = (scores.softmax(-1) @ vs).transpose(0, 1)
    return out


def _flex(q, k, v, starts, lengths):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    seg = torch.full((q.shape[0],), -1)
    for i, (s, n) in enumerate(zip(starts, lengths)):
        seg[s:s + n] = i

    def doc_causal(b, h, qi, ki):
        return (seg[qi] == seg[ki]) & (ki <= qi)

    mask = create_block_mask(doc_causal, None, None, q.shape[0], q.shape[0], device="cpu")
    out = flex_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                         v.transpose(0, 1)[None], block_mask=mask,
                         enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)


def _nested(q, k, v, starts, lengths):
    offsets = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)))
    nq, nk, nv = (torch.nested.nested_tensor_from_jagged(t, offsets).transpose(1, 2)
                  for t in (q, k, v))
    return F.scaled_dot_product_attention(nq, nk, nv, is_causal=True).transpose(1, 2).values()


def run_method(method, q, k, v, starts, lengths):
    if method == "flex":
        return _flex(q, k, v, starts, lengths)
    if method == "nested":
        return _nested(q, k, v, starts, lengths)
    if method == "padded":
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        return packed_causal_attention(q, k, v, starts, lengths, method="bucketed",
                                       buckets=[order])
    if method == "bucketed":
        return packed_causal_attention(q, k, v, starts, lengths, method="auto")
    return packed_causal_attention(q, k, v, starts, lengths, method=method)


def check_method(method, q, k, v, starts, lengths, expected):
    """None when the method runs forward + backward and matches ``expected``, else why not."""
    try:
        out = run_method(method, q, k, v, starts, lengths)
        err = (out.double() - expected).abs().max().item()
        if err > 1e-4:
            return f"WRONG (max err {err:.2e})"
        out.sum().backward()
    except Exception as exc:  # report why a candidate cannot run here
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:70]}"
    return None


def time_methods(methods, q, k, v, starts, lengths, warmup, repeat):
    """(median, min, median ratio to the first method) of forward + backward seconds per
    method; the methods run in turn (A B C A B C ...), so a drift in machine speed hits them
    alike, and the ratio is taken round by round."""
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    times = {m: [] for m in methods}
    for i in range(warmup + repeat):
        for method in methods:
            for t in (q, k, v):
                t.grad = None
            start = time.perf_counter()
            run_method(method, q, k, v, starts, lengths).backward(grad)
            if i >= warmup:
                times[method].append(time.perf_counter() - start)
    base = times[methods[0]] if methods else []
    return {m: (statistics.median(ts), min(ts),
                statistics.median(t / b for t, b in zip(ts, base)))
            for m, ts in times.items()}


def bench_cell(tokens, heads, groups, dim, workload, methods, warmup, repeat, dense_max):
    lengths = document_lengths(workload, tokens)
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(tokens, heads, dim, generator=gen, requires_grad=True)
    k = torch.randn(tokens, groups, dim, generator=gen, requires_grad=True)
    v = torch.randn(tokens, groups, dim, generator=gen, requires_grad=True)
    expected = reference(q.detach(), k.detach(), v.detach(), starts, lengths)
    row, runnable = {}, []
    for method in methods:
        if method == "dense" and tokens > dense_max:
            row[method] = f"skipped (T > --dense-max {dense_max})"
            continue
        why = check_method(method, q, k, v, starts, lengths, expected)
        if why is None:
            runnable.append(method)
        else:
            row[method] = why
    row.update(time_methods(runnable, q, k, v, starts, lengths, warmup, repeat))
    return lengths, len(plan_buckets(lengths, heads)), {m: row[m] for m in methods}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 8192])
    ap.add_argument("--heads", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--groups", type=int, default=None, help="KV heads (default: heads / 4, min 1)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--workload", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dense-max", type=int, default=4096)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, head_dim {args.dim}, fwd+bwd, "
          f"median/min of {args.repeat} (ms), (x median ratio to {args.methods[0]})")
    for tokens in args.tokens:
        for heads in args.heads:
            groups = args.groups or max(1, heads // 4)
            for workload in args.workload:
                lengths, n_buckets, row = bench_cell(tokens, heads, groups, args.dim, workload,
                                                     args.methods, args.warmup, args.repeat,
                                                     args.dense_max)
                cells = [f"{m}={v[0] * 1e3:.1f}/{v[1] * 1e3:.1f} (x{v[2]:.2f})"
                         if isinstance(v, tuple)
                         else f"{m}: {v}" for m, v in row.items()]
                print(f"T={tokens} heads={heads}/{groups} {workload} docs={len(lengths)} "
                      f"max={max(lengths)} buckets={n_buckets} | " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
