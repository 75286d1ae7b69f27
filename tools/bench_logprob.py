"""Benchmark the fused log-prob kernel against plain torch, megatron-core and Liger-Kernel.

Every variant runs in ITS OWN PROCESS (a variant measured beside others in one process
inherits their allocator, page-cache and thread-pool state: a one-process harness reported
1.56x where separate processes gave ~1.0x). The driver starts one process per (round,
variant), the variants in turn — A B C A B C … with the order rotated each round — and each
process times a few calls after a warm-up and prints one ``RESULT {json}`` line.

Log-prob variants (target log-probs of the same logits + the gradient of their masked sum
w.r.t. the logits, forward + ``torch.autograd.grad``):

* ``naive``        — ``log_softmax(logits.float()).gather`` (autograd does the rest)
* ``megatron``     — ``megatron.core.tensor_parallel.vocab_parallel_cross_entropy`` at TP=1
                     (on fp32 input it works in place: the softmax overwrites the logits)
* ``ours_inplace`` — ``lens_kernels.logprobs_and_confidence`` as the actor calls it:
                     ``return_entropy=True`` (a detached metric), ``inplace_backward=True``
* ``ours``         — the same with a fresh gradient buffer (``inplace_backward=False``)
* ``liger``        — Liger-Kernel's cross entropy, when installed and on GPU (Triton only)

``--linear`` variants (LM head included: hidden ``[N, H]`` × weight ``[V, H]``, gradients
w.r.t. both, of the actor's clipped policy loss at an on-policy first step — ratio 1, every
token with a gradient): ``linear_logits`` — ``hidden @ weight.T``, ``ours_inplace``, the loss;
``linear_fused_loss`` — ``lens_kernels.linear_logprobs_with_loss``, what the actor trains with
under ``model.fused_linear_logprobs`` (the loss differentiated inside the chunks, never the
full logits); ``linear_fused`` — the autograd form ``linear_logprobs_and_confidence`` + the
loss (backward recomputes the logits).

Timing: CPU ``time.perf_counter`` (wall) and ``time.process_time`` (CPU seconds of all the
process's threads — on an oversubscribed machine the wall time mostly measures the share of
the cores a process was given), GPU CUDA events; each call gets a fresh copy of the logits
made outside the timed region. Reported: the median over all calls of all processes, and the
median of the per-round ratios baseline/variant (rounds pair neighbouring processes).
Peak extra memory (CPU, first call of each process): ``VmHWM`` (reset by writing ``5`` to
``/proc/self/clear_refs`` just before the call) minus ``VmRSS`` before it, inputs allocated;
it includes the returned gradients, which are also reported apart (``grad_bytes``). GPU:
``torch.cuda.max_memory_allocated`` delta. Ratios are to the logits' size ``N·V·itemsize``.

    python tools/bench_logprob.py                          # CPU [4096 x 32000] fp32 + bf16
    python tools/bench_logprob.py --linear --hidden 1024   # fused LM head vs logits path (fp32)
    python tools/bench_logprob.py --variant megatron --dtype fp32   # one process, one variant
    python tools/bench_logprob.py --gpu                    # bf16 [32768 x 128256], [16384 x 151936]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

H100_HBM_BYTES_PER_S = 3.35e12   # nominal (SXM5 spec sheet), not measured
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LOGPROB_VARIANTS = ("megatron", "ours_inplace", "ours", "naive", "liger")
LINEAR_VARIANTS = ("linear_logits", "linear_fused_loss", "linear_fused")


# ----------------------------------------------------------------------------- variants
def _naive(x, t, m):
    logp = torch.log_softmax(x.float(), dim=-1).gather(-1, t.unsqueeze(-1)).squeeze(-1)
    return (x,), (logp * m).sum()


def _megatron(x, t, m):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return (x,), -(vocab_parallel_cross_entropy(x, t) * m).sum()


def _ours(x, t, m, inplace=False):
    from lens_kernels import logprobs_and_confidence

    out = logprobs_and_confidence(x, t, m, return_entropy=True, inplace_backward=inplace)
    return (x,), out.logprob_sum.sum()


def _liger(x, t, m):
    from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss

    flat_t = torch.where(m.bool(), t, torch.full_like(t, -100)).reshape(-1)
    return (x,), -LigerCrossEntropyLoss(reduction="sum")(x.reshape(-1, x.shape[-1]), flat_t)


POLICY = {}   # --linear: the actor's clipped policy loss and its per-token constants


def set_policy_terms(hidden, weight, t, m) -> None:
    """The first, on-policy step of GRPO: old log-probs = the current ones (ratio 1, so every
    token has a gradient: no chunk can be skipped), advantage +1, token normalisation."""
    from lens_kernels import linear_logprobs_and_confidence
    from lens_megatron.algorithms.loss import ClippedPolicyLoss, LossConfig

    with torch.no_grad():
        old = linear_logprobs_and_confidence(hidden, weight, t, m).token_logprobs
    loss_fn = ClippedPolicyLoss(LossConfig(normalization="token"))
    n = m.sum()
    valid = m.reshape(-1)
    weights = loss_fn.token_weights(valid, torch.zeros_like(t.reshape(-1)), 1, n)
    adv = torch.ones(t.shape[0], device=t.device)
    POLICY.update(loss_fn=loss_fn, old=old, adv=adv, n=n, token_loss=loss_fn.token_loss(
        old.reshape(-1), adv.expand(valid.numel()), valid, weights))


def _policy_loss(out, m):
    p = POLICY
    return p["loss_fn"](out.token_logprobs, p["old"], p["adv"], m, p["n"], entropy=out.entropy)


def _linear_logits(inputs, t, m):
    """The logits path as the actor trains: LM-head GEMM, our kernel in place, the loss."""
    from lens_kernels import logprobs_and_confidence

    hidden, weight = inputs
    out = logprobs_and_confidence(hidden @ weight.t(), t, m, return_entropy=True,
                                  inplace_backward=True)
    loss, _ = _policy_loss(out, m)
    return (hidden, weight), loss


def _linear_fused_loss(inputs, t, m):
    """``model.fused_linear_logprobs`` as the actor trains: the loss differentiated inside
    the chunks (three GEMMs), then the loss's metrics on the detached log-probs."""
    from lens_kernels import linear_logprobs_with_loss

    hidden, weight = inputs
    loss, out = linear_logprobs_with_loss(hidden, weight, t, m, POLICY["token_loss"],
                                          return_entropy=True)
    _policy_loss(out, m)
    return (hidden, weight), loss


def _linear_fused(inputs, t, m):
    """The autograd form (forward, then backward recomputing the logits: four GEMMs)."""
    from lens_kernels import linear_logprobs_and_confidence

    hidden, weight = inputs
    out = linear_logprobs_and_confidence(hidden, weight, t, m, return_entropy=True)
    loss, _ = _policy_loss(out, m)
    return (hidden, weight), loss


STEPS = {"naive": _naive, "megatron": _megatron, "ours": _ours, "liger": _liger,
         "ours_inplace": lambda x, t, m: _ours(x, t, m, inplace=True),
         "linear_logits": _linear_logits, "linear_fused_loss": _linear_fused_loss,
         "linear_fused": _linear_fused}


def available_variants(device: str, wanted) -> list[str]:
    """The wanted variants that can run here (Liger needs its package and a GPU)."""
    names = []
    for name in wanted:
        if name == "liger":
            try:
                import liger_kernel  # noqa: F401
            except ImportError:
                print("liger: liger_kernel is not installed, skipped", file=sys.stderr)
                continue
            if device != "cuda":
                print("liger: Triton-only (GPU), skipped on CPU", file=sys.stderr)
                continue
        names.append(name)
    return names


# ----------------------------------------------------------------------------- setup
def setup_megatron(device: str) -> None:
    """A 1-process group + TP=1 model-parallel state (megatron reads the TP group globally)."""
    import socket

    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)


def make_inputs(n: int, v: int, dtype: torch.dtype, device: str, seed: int = 0, hidden=None):
    """Logits ``[1, n, v]`` (or hidden ``[1, n, H]`` + weight ``[v, H]`` giving logits of the
    same scale, std 3), filled in chunks (no full-size temporaries); targets; full mask."""
    gen = torch.Generator(device=device).manual_seed(seed)
    width = hidden or v
    x = torch.empty(1, n, width, dtype=dtype, device=device)
    step = max(1, (64 << 20) // (4 * width))
    for r0 in range(0, n, step):
        x[0, r0:r0 + step].normal_(generator=gen).mul_(1.0 if hidden else 3.0)
    t = torch.randint(0, v, (1, n), generator=gen, device=device)
    m = torch.ones(1, n, dtype=torch.bool, device=device)
    if hidden:
        w = torch.randn(v, hidden, generator=gen, device=device).mul_(3.0 / hidden ** 0.5)
        return (x, w.to(dtype)), t, m
    return x, t, m


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- one process
def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _fresh(base):
    """A fresh, grad-requiring copy of the inputs (logits are consumed by in-place variants)."""
    if isinstance(base, tuple):
        return tuple(b.detach().clone().requires_grad_(True) for b in base)
    return base.clone().requires_grad_(True)


def _call(name, inputs, t, m, need_grad):
    with torch.set_grad_enabled(need_grad):
        leaves, loss = STEPS[name](inputs, t, m)
        return torch.autograd.grad(loss, leaves) if need_grad else (loss,)


def _memory_call(name, base, t, m, device) -> dict:
    """Peak extra memory of one fwd+bwd call (and the bytes of the returned gradients)."""
    inputs = _fresh(base)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        grads = _call(name, inputs, t, m, True)
        torch.cuda.synchronize()
        extra, method = torch.cuda.max_memory_allocated() - before, "cuda max_memory_allocated"
    else:
        rss_before = _proc_status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        grads = _call(name, inputs, t, m, True)
        extra, method = (_proc_status_kib("VmHWM") - rss_before) * 1024, "VmHWM - VmRSS"
    owned = sum(g.untyped_storage().nbytes() for g in grads
                if all(g.data_ptr() != x.data_ptr() for x in (inputs if isinstance(inputs, tuple)
                                                              else (inputs,))))
    return {"extra_bytes": extra, "grad_bytes": owned, "method": method}


def _timed(name, base, t, m, device, need_grad) -> tuple[float, float]:
    """(wall ms, process CPU ms) of one call; CPU: all threads, user + system."""
    inputs = _fresh(base)
    _sync(device)
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = _call(name, inputs, t, m, need_grad)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end), float("nan")
    t0, c0 = time.perf_counter(), time.process_time()
    out = _call(name, inputs, t, m, need_grad)
    wall, cpu = (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3
    del out                  # freeing a returned gradient buffer is not part of the call
    return wall, cpu


def run_single(args) -> dict:
    """This process: one variant, one dtype — memory on the first call, then timed calls."""
    device = "cuda" if args.gpu else "cpu"
    n, v = args.shape[0] if args.shape else (4096, 32000)
    if args.variant == "megatron":
        setup_megatron(device)
    base, t, m = make_inputs(n, v, DTYPES[args.dtype], device, hidden=args.hidden)
    if args.hidden:
        set_policy_terms(*base, t, m)
    result = {"variant": args.variant, "dtype": args.dtype, "shape": [n, v],
              "hidden": args.hidden, "threads": torch.get_num_threads(),
              "loadavg_before": os.getloadavg()}
    result["memory"] = _memory_call(args.variant, base, t, m, device)
    for _ in range(max(0, args.warmup - 1)):
        _timed(args.variant, base, t, m, device, True)
    calls = [_timed(args.variant, base, t, m, device, True) for _ in range(args.repeats)]
    result["fwd_bwd_ms"] = [w for w, _ in calls]
    result["fwd_bwd_cpu_ms"] = [c for _, c in calls]
    if not args.hidden:
        result["fwd_ms"] = [_timed(args.variant, base, t, m, device, False)[0]
                            for _ in range(args.repeats)]
    result["loadavg_after"] = os.getloadavg()
    result["logits_bytes"] = n * v * DTYPES[args.dtype].itemsize
    return result


# ----------------------------------------------------------------------------- driver
def _spawn(name, dtype, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--variant", name, "--dtype", dtype,
           "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    if args.shape:
        cmd += ["--shape", *map(str, args.shape[0])]
    if args.hidden:
        cmd += ["--hidden", str(args.hidden)]
    if args.gpu:
        cmd.append("--gpu")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def run_interleaved(names, dtype, args) -> dict:
    """``args.rounds`` rounds, one process per variant per round, order rotated each round."""
    rounds = []
    for rnd in range(args.rounds):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        rounds.append({name: _spawn(name, dtype, args) for name in order})
        print(f"  {dtype} round {rnd + 1}/{args.rounds}: " + ", ".join(
            f"{k} {statistics.median(r['fwd_bwd_ms']):.0f} ms" for k, r in rounds[-1].items()),
            file=sys.stderr, flush=True)
    base = args.baseline if args.baseline in names else names[0]
    summary = {}
    for name in names:
        runs = [r[name] for r in rounds]
        fb = [x for r in runs for x in r["fwd_bwd_ms"]]
        cpu = [x for r in runs for x in r["fwd_bwd_cpu_ms"]]
        entry = {"fwd_bwd_ms": statistics.median(fb), "fwd_bwd_samples_ms": [round(x, 1) for x in fb],
                 "fwd_bwd_cpu_ms": statistics.median(cpu),
                 "per_round_medians_ms": [round(statistics.median(r["fwd_bwd_ms"]), 1) for r in runs],
                 "peak_extra_x_logits": max(r["memory"]["extra_bytes"] for r in runs)
                 / runs[0]["logits_bytes"],
                 "grad_bytes_x_logits": runs[0]["memory"]["grad_bytes"] / runs[0]["logits_bytes"],
                 "loadavg": [runs[0]["loadavg_before"][0], runs[-1]["loadavg_after"][0]]}
        if "fwd_ms" in runs[0]:
            entry["fwd_ms"] = statistics.median([x for r in runs for x in r["fwd_ms"]])
        ratios = [statistics.median(r[base]["fwd_bwd_ms"]) / statistics.median(r[name]["fwd_bwd_ms"])
                  for r in rounds]
        entry[f"speedup_vs_{base}"] = statistics.median(ratios)
        entry[f"speedup_vs_{base}_per_round"] = [round(x, 3) for x in ratios]
        entry[f"cpu_ratio_vs_{base}"] = statistics.median(
            [statistics.median(r[base]["fwd_bwd_cpu_ms"]) / statistics.median(r[name]["fwd_bwd_cpu_ms"])
             for r in rounds])
        summary[name] = entry
    return {"dtype": dtype, "baseline": base, "variants": summary}


def _fmt(x, spec=".1f"):
    return "—" if x is None else format(x, spec)


def print_table(res: dict) -> None:
    base = res["baseline"]
    print(f"\n{res['dtype']}   speedup = median over rounds of ({base} / variant)")
    print(f"{'variant':18} {'fwd+bwd ms':>11} {'cpu ms':>8} {'fwd ms':>8} {'speedup':>8} "
          f"{'cpu ratio':>9} {'per round':>30} {'peak extra':>11} {'(grads)':>8} "
          f"{'beyond grads':>12}")
    for name, e in res["variants"].items():
        rounds = " ".join(f"{x:.2f}" for x in e[f"speedup_vs_{base}_per_round"])
        print(f"{name:18} {_fmt(e['fwd_bwd_ms']):>11} {_fmt(e['fwd_bwd_cpu_ms']):>8} "
              f"{_fmt(e.get('fwd_ms')):>8} {e[f'speedup_vs_{base}']:7.2f}x "
              f"{e[f'cpu_ratio_vs_{base}']:8.2f}x {rounds:>30} {e['peak_extra_x_logits']:10.2f}x "
              f"{e['grad_bytes_x_logits']:7.2f}x "
              f"{e['peak_extra_x_logits'] - e['grad_bytes_x_logits']:11.2f}x")


def bytes_model(n: int, v: int, itemsize: int) -> dict:
    """Bytes the Triton kernels move vs the HBM floor (a model, not a measurement)."""
    logits = n * v * itemsize
    rows = {"forward_floor": logits, "forward_kernel": logits + n * (8 + 1 + 16),
            "backward_floor": 2 * logits, "backward_kernel": 2 * logits + n * (8 + 4 + 4)}
    return {k: {"bytes": b, "ms_at_nominal_3.35TB/s": b / H100_HBM_BYTES_PER_S * 1e3}
            for k, b in rows.items()}


def print_model(shapes, dtypes) -> None:
    print("bytes-moved MODEL of the Triton kernels vs the HBM floor "
          "(H100 HBM3 3.35 TB/s nominal; not a measurement)")
    print(f"{'shape':>16} {'dtype':5} {'pass':16} {'GB':>8} {'ms':>8}")
    for n, v in shapes:
        for d in dtypes:
            for k, e in bytes_model(n, v, DTYPES[d].itemsize).items():
                print(f"{f'{n}x{v}':>16} {d:5} {k:16} {e['bytes'] / 1e9:8.3f} "
                      f"{e['ms_at_nominal_3.35TB/s']:8.3f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="GPU presets (bf16, CUDA events)")
    parser.add_argument("--shape", type=int, nargs=2, action="append", metavar=("N", "V"))
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES))
    parser.add_argument("--variants", nargs="+", choices=LOGPROB_VARIANTS + LINEAR_VARIANTS)
    parser.add_argument("--linear", action="store_true", help="fused LM-head variants")
    parser.add_argument("--hidden", type=int, help="hidden size of the --linear variants")
    parser.add_argument("--baseline", help="variant the speedups are taken against")
    parser.add_argument("--rounds", type=int, default=3, help="processes per variant")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per process")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per process")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--model-only", action="store_true",
                        help="print only the bytes-moved model for the chosen shapes")
    parser.add_argument("--variant", help="run this one variant in this process (JSON line)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = parser.parse_args(argv)
    if args.linear and not args.hidden:
        args.hidden = 1024
    if args.variant:
        print("RESULT " + json.dumps(run_single(args)), flush=True)
        return
    device = "cuda" if args.gpu else "cpu"
    shapes = args.shape or ([[32768, 128256], [16384, 151936]] if args.gpu else [[4096, 32000]])
    dtypes = args.dtypes or (["bf16"] if args.gpu else ["fp32"] if args.linear else ["fp32", "bf16"])
    if args.model_only:
        print_model(shapes, dtypes)
        return
    wanted = args.variants or (LINEAR_VARIANTS if args.linear else LOGPROB_VARIANTS)
    names = available_variants(device, wanted)
    args.baseline = args.baseline or ("linear_logits" if args.linear else "megatron")
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "machine": platform.node(), "cpus": os.cpu_count(),
            "device": torch.cuda.get_device_name() if args.gpu else platform.processor() or "cpu",
            "torch": torch.__version__, "rounds": args.rounds, "repeats": args.repeats,
            "warmup": args.warmup}
    results = []
    for n, v in shapes:
        args.shape = [[n, v]]
        for d in dtypes:
            res = run_interleaved(names, d, args)
            res["shape"] = [n, v]
            results.append(res)
            print(f"\n[{n} x {v}]" + (f" hidden {args.hidden}" if args.hidden else ""), end="")
            print_table(res)
    payload = {"meta": meta, "results": results}
    print("\nJSON:", json.dumps(payload))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)


if __name__ == "__main__":
    main()
