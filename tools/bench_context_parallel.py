"""Peak activation memory per rank of one long sequence, forward + backward, CP=2 vs CP=1.

A megatron-core GPTModel with the local layer spec (SDPA attention; under CP the all-gather
K/V attention of ``models/context_attention.py``) runs one sequence of ``--seq`` tokens through
forward, a token cross-entropy loss and backward, on CPU over gloo. Every variant runs in fresh
processes (one per CP rank). Per rank: the resident set right before the forward (model and
inputs built) and its high-water mark after the backward (``VmHWM``, reset just before the
forward by writing ``5`` to ``/proc/self/clear_refs``); their difference is the peak extra
memory of the step — activations, attention buffers and the parameter gradients (created by
the backward; reported separately so they can be subtracted). The CP=2 loss is checked against
the CP=1 loss (the two must compute the same thing).

    python tools/bench_context_parallel.py           # 2,048 tokens, hidden 256, 4 layers
    python tools/bench_context_parallel.py --seq 4096 --cp 1 2 4 --json out.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lens_megatron.parallel import context as cp_layout  # noqa: E402
from lens_megatron.parallel.spawn import run_in_processes  # noqa: E402


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _enable_cp_local_spec() -> None:
    """The two patches CP needs on the local spec until the lead integrates them
    (CP_NOTES.md): the CP core attention, and megatron's RoPE slicing without pinned memory."""
    from megatron.core.models.common.embeddings import rotary_pos_embedding

    from lens_megatron.models import layer_spec
    from lens_megatron.models.context_attention import ContextParallelSDPAttention

    layer_spec.SDPACoreAttention = ContextParallelSDPAttention
    rotary_pos_embedding.get_pos_emb_on_this_cp_rank = cp_layout.rope_for_rank


def _build(args, cp: int):
    from lens_megatron.models.arch import ModelArch, ParallelLayout, Precision
    from lens_megatron.models.builder import build_model_chunks
    from lens_megatron.parallel.initialize import initialize_model_parallel

    if cp > 1:
        _enable_cp_local_spec()
    initialize_model_parallel(1, 1, None, cp)
    arch = ModelArch(family="qwen2", vocab_size=args["vocab"], hidden_size=args["hidden"],
                     ffn_hidden_size=4 * args["hidden"], num_layers=args["layers"],
                     num_attention_heads=args["heads"], num_query_groups=args["groups"],
                     max_position_embeddings=max(4096, args["seq"]))
    layout = ParallelLayout(context_parallel_size=cp)
    return arch, build_model_chunks(arch, layout, Precision("fp32"), "local", seed=1)[0]


def rank_worker(args: dict, cp: int) -> dict:
    """One rank of one variant: build, then measure one forward + backward."""
    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state as ps

    torch.set_num_threads(args["threads"])
    arch, model = _build(args, cp)
    seq = args["seq"]
    ids = torch.randint(0, arch.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    rank = ps.get_context_parallel_rank()
    targets = torch.roll(ids, -1, dims=1)
    local_ids = cp_layout.split_for_rank(ids, rank, cp)
    local_targets = cp_layout.split_for_rank(targets, rank, cp)
    positions = cp_layout.local_positions(seq, rank, cp).unsqueeze(0)
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rss_before = _kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = time.perf_counter()
    logits = model(local_ids, positions, None)  # [1, seq/cp, vocab]
    ce = torch.nn.functional.cross_entropy(logits[0, :, :arch.vocab_size].float(),
                                           local_targets[0], reduction="sum")
    (ce / seq).backward()
    seconds = time.perf_counter() - start
    peak = _kib("VmHWM")
    loss = ce.detach().clone()
    if cp > 1:
        torch.distributed.all_reduce(loss, group=ps.get_context_parallel_group())
    return {"cp_rank": rank, "rss_before_mib": rss_before / 1024,
            "peak_extra_mib": (peak - rss_before) / 1024,
            "param_grads_mib": grad_bytes / 2**20, "seconds": seconds,
            "loss": float(loss) / seq, "local_tokens": int(local_ids.numel())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--cp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", default=None)
    ns = parser.parse_args()
    args = vars(ns)
    rows = []
    for cp in ns.cp:
        cp_layout.check_sequence_length(ns.seq, cp)
        env = {"LENS_THREADS_PER_RANK": str(ns.threads)}
        ranks = run_in_processes(rank_worker, cp, (args, cp), timeout=1800, env=env)
        rows.append({"cp": cp, "ranks": ranks})
    reference = rows[0]["ranks"][0]["loss"]
    print(f"{ns.seq} tokens, hidden {ns.hidden}, {ns.layers} layers, {ns.heads} heads / "
          f"{ns.groups} KV groups, vocab {ns.vocab}, fp32, {ns.threads} thread(s) per rank")
    print(f"{'CP':>3} {'rank':>4} {'tokens':>6} {'peak extra MiB':>15} {'of it grads':>11} "
          f"{'fwd+bwd s':>9} {'loss':>10}")
    for row in rows:
        for r in row["ranks"]:
            print(f"{row['cp']:>3} {r['cp_rank']:>4} {r['local_tokens']:>6} "
                  f"{r['peak_extra_mib']:>15.1f} {r['param_grads_mib']:>11.1f} "
                  f"{r['seconds']:>9.2f} {r['loss']:>10.6f}")
        if abs(row["ranks"][0]["loss"] - reference) > 1e-4 * max(1.0, abs(reference)):
            raise SystemExit(f"CP={row['cp']} loss {row['ranks'][0]['loss']} != CP={rows[0]['cp']}"
                             f" loss {reference}")
    base = max(r["peak_extra_mib"] for r in rows[0]["ranks"])
    for row in rows[1:]:
        worst = max(r["peak_extra_mib"] for r in row["ranks"])
        print(f"CP={row['cp']}: max peak extra per rank {worst:.1f} MiB = "
              f"{worst / base:.2f} x CP={rows[0]['cp']}'s {base:.1f} MiB")
    if ns.json:
        meta = {"date": datetime.date.today().isoformat(), "machine": platform.node(),
                "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                "method": "VmHWM after clear_refs=5 minus VmRSS before the forward"}
        with open(ns.json, "w") as f:
            json.dump({"args": args, "meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
