"""Time per-document causal attention over one packed row, forward + backward, on this machine.

Candidates (all exact, checked against a float64 per-document reference before timing):
  segments  one SDPA call per document, is_causal=True
  bucketed  documents sorted by length, cut into buckets by the cost model, each bucket one
            right-padded batched SDPA call (what method="auto" runs)
  padded    every document in ONE right-padded batch (bucketed with a single bucket)
  dense     one SDPA call with a [T, T] block-diagonal causal mask
  sliced    segments, but documents taken by slicing q[s:e] instead of torch.split (each
            slice's backward writes a full [T, h, d] gradient: quadratic in the documents)
  flex      FlexAttention with a document block mask (reports why it cannot run on CPU)
  nested    jagged nested tensors with is_causal (reports why it cannot run)

    python tools/bench_packed_attention.py                      # the default grid, a table
    python tools/bench_packed_attention.py --tokens 4096 --heads 16 --groups 4 \
        --workload longtail --methods segments bucketed         # one cell

Workloads: ``longtail`` lognormal document lengths (sigma 1, median T/16) filling T;
``short`` many documents of 16-96 tokens; ``tiny`` of 4-24 tokens; ``equal`` T/8-token
documents. Times are the
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

from lens_megatron.models.packed_attention import (CALL_OVERHEAD_PAIRS, packed_causal_attention,
                                                   plan_buckets)

WORKLOADS = ("longtail", "short", "tiny", "equal")
METHODS = ("segments", "bucketed", "padded", "dense", "sliced", "flex", "nested")


def document_lengths(workload: str, tokens: int, seed: int = 0) -> list[int]:
    """Lengths summing to exactly ``tokens``."""
    rng = random.Random(seed)
    out: list[int] = []
    while sum(out) < tokens:
        if workload == "longtail":
            n = int(rng.lognormvariate(math.log(tokens / 16), 1.0))
        elif workload == "short":
            n = rng.randint(16, 96)
        elif workload == "tiny":
            n = rng.randint(4, 24)
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


def _sliced(q, k, v, starts, lengths):
    out = torch.zeros_like(q)
    pieces = []
    for s, n in zip(starts, lengths):
        o = F.scaled_dot_product_attention(
            q[s:s + n].transpose(0, 1)[None], k[s:s + n].transpose(0, 1)[None],
            v[s:s + n].transpose(0, 1)[None], is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
        pieces.append(o[0].transpose(0, 1))
    return torch.cat(pieces) if sum(lengths) == q.shape[0] else out


def run_method(method, q, k, v, starts, lengths, overhead=CALL_OVERHEAD_PAIRS):
    if method == "sliced":
        return _sliced(q, k, v, starts, lengths)
    if method == "flex":
        return _flex(q, k, v, starts, lengths)
    if method == "nested":
        return _nested(q, k, v, starts, lengths)
    if method == "padded":
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        return packed_causal_attention(q, k, v, starts, lengths, method="bucketed",
                                       buckets=[order])
    if method == "bucketed":
        buckets = plan_buckets(lengths, q.shape[1], call_overhead_pairs=overhead)
        return packed_causal_attention(q, k, v, starts, lengths, method="bucketed",
                                       buckets=buckets)
    return packed_causal_attention(q, k, v, starts, lengths, method=method)


def check_method(method, q, k, v, starts, lengths, expected, overhead):
    """None when the method runs forward + backward and matches ``expected``, else why not."""
    try:
        out = run_method(method, q, k, v, starts, lengths, overhead)
        err = (out.double() - expected).abs().max().item()
        if err > 1e-4:
            return f"WRONG (max err {err:.2e})"
        out.sum().backward()
    except Exception as exc:  # report why a candidate cannot run here
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:70]}"
    return None


def time_methods(methods, q, k, v, starts, lengths, warmup, repeat, clock, overhead):
    """(median, min, median ratio to the first method) of forward + backward seconds per
    method; the methods run in turn (A B C A B C ...), so a drift in machine speed hits them
    alike, and the ratio is taken round by round."""
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    times = {m: [] for m in methods}
    for i in range(warmup + repeat):
        for method in methods:
            for t in (q, k, v):
                t.grad = None
            start = clock()
            run_method(method, q, k, v, starts, lengths, overhead).backward(grad)
            if i >= warmup:
                times[method].append(clock() - start)
    base = times[methods[0]] if methods else []
    return {m: (statistics.median(ts), min(ts),
                statistics.median(t / b for t, b in zip(ts, base)))
            for m, ts in times.items()}


def bench_cell(tokens, heads, groups, dim, workload, methods, warmup, repeat, dense_max,
               clock=time.perf_counter, overhead=CALL_OVERHEAD_PAIRS):
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
        why = check_method(method, q, k, v, starts, lengths, expected, overhead)
        if why is None:
            runnable.append(method)
        else:
            row[method] = why
    row.update(time_methods(runnable, q, k, v, starts, lengths, warmup, repeat, clock, overhead))
    n_buckets = len(plan_buckets(lengths, heads, call_overhead_pairs=overhead))
    return lengths, n_buckets, {m: row[m] for m in methods}


def calibrate(heads, groups, dim, repeat, clock):
    """Fit ``t = a + b * heads * L(L+1)/2`` to one causal SDPA call (forward + backward) per
    length L; ``a / b`` is the call overhead in query-key pairs x heads, the unit of
    ``CALL_OVERHEAD_PAIRS`` in ``lens_megatron/models/packed_attention.py``."""
    xs, ys = [], []
    for length in (8, 16, 32, 64, 128, 256, 512):
        q, k, v = (torch.randn(1, h, length, dim, requires_grad=True)
                   for h in (heads, groups, groups))
        grad = torch.randn(1, heads, length, dim)
        times = []
        for i in range(repeat + 1):
            start = clock()
            F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           enable_gqa=heads != groups).backward(grad)
            if i:
                times.append(clock() - start)
        xs.append(heads * length * (length + 1) / 2)
        ys.append(statistics.median(times))
        print(f"  L={length}: {ys[-1] * 1e3:.3f} ms")
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    a = my - b * mx
    print(f"heads {heads}/{groups}: overhead {a * 1e3:.3f} ms, {b * 1e9:.2f} ns per pair x head,"
          f" overhead = {a / b:.0f} pairs x heads")


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
    ap.add_argument("--dense-max", type=int, default=2048)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: this process's CPU time (with --threads 1, robust to other load)")
    ap.add_argument("--overhead", type=int, default=CALL_OVERHEAD_PAIRS,
                    help="call overhead (query-key pairs x heads) of the bucket cost model")
    ap.add_argument("--calibrate", action="store_true",
                    help="fit the per-call overhead of the bucket cost model instead")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    if args.calibrate:
        for heads in args.heads:
            calibrate(heads, args.groups or max(1, heads // 4), args.dim, args.repeat, clock)
        return
    print(f"torch {torch.__version__}, {args.threads} threads, {args.clock} clock, "
          f"head_dim {args.dim}, fwd+bwd, "
          f"median/min of {args.repeat} (ms), (x median ratio to {args.methods[0]})")
    for tokens in args.tokens:
        for heads in args.heads:
            groups = args.groups or max(1, heads // 4)
            for workload in args.workload:
                lengths, n_buckets, row = bench_cell(tokens, heads, groups, args.dim, workload,
                                                     args.methods, args.warmup, args.repeat,
                                                     args.dense_max, clock, args.overhead)
                cells = [f"{m}={v[0] * 1e3:.1f}/{v[1] * 1e3:.1f} (x{v[2]:.2f})"
                         if isinstance(v, tuple)
                         else f"{m}: {v}" for m, v in row.items()]
                print(f"T={tokens} heads={heads}/{groups} {workload} docs={len(lengths)} "
                      f"max={max(lengths)} buckets={n_buckets} | " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
