"""Benchmark the fused log-prob kernel against plain torch, megatron-core and Liger-Kernel.

Every variant computes the target log-probs of the same logits and the gradient of their
sum w.r.t. the logits (forward + ``torch.autograd.grad``):

* ``naive``        — ``log_softmax(logits.float()).gather`` (autograd does the rest)
* ``megatron``     — ``megatron.core.tensor_parallel.vocab_parallel_cross_entropy`` at TP=1
                     (note: on fp32 input it works in place and overwrites the logits)
* ``ours``         — ``lens_kernels.logprobs_and_confidence`` (default: fresh gradient buffer)
* ``ours_inplace`` — the same with ``inplace_backward=True`` (gradient written into the logits)
* ``ours_omp``     — ``ours`` on CPU with ``LENS_KERNELS_CPU_WORKERS=1``: chunks run inline,
                     each op parallelised by torch's OpenMP (instead of two worker threads)
* ``liger``        — Liger-Kernel's cross entropy, when installed and on GPU (Triton only)

Timing: all variants in one process on the same inputs, interleaved (A B C A B C …, the
order rotated each round) because the machine is shared and noisy; each call gets a fresh
copy of the logits made outside the timed region; the median and its ratio to megatron are
reported. CPU: ``time.perf_counter``; GPU: CUDA events.

Peak extra memory: CPU — each variant runs once in a fresh subprocess; the peak resident
set (``VmHWM``, reset just before the call by writing ``5`` to ``/proc/self/clear_refs``)
minus the resident set right before the call, inputs already allocated; it therefore
includes the returned gradient. GPU — ``torch.cuda.max_memory_allocated`` minus the
allocation before the call. Both are reported as a multiple of the logits' size.

Also prints a bytes-moved *model* (not a measurement) of the Triton kernels vs the HBM
floor at the H100's nominal 3.35 TB/s.

    python tools/bench_logprob.py                      # CPU: [4096 x 32000] fp32 and bf16
    python tools/bench_logprob.py --gpu                # bf16 [32768 x 128256], [16384 x 151936]
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
ALL_VARIANTS = ("naive", "megatron", "ours", "ours_inplace", "ours_omp", "liger")


# ----------------------------------------------------------------------------- variants
def _naive(x, t, m, need_grad):
    logp = torch.log_softmax(x.float(), dim=-1).gather(-1, t.unsqueeze(-1)).squeeze(-1)
    loss = (logp * m).sum()
    return torch.autograd.grad(loss, x)[0] if need_grad else loss


def _megatron(x, t, m, need_grad):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    loss = -(vocab_parallel_cross_entropy(x, t) * m).sum()
    return torch.autograd.grad(loss, x)[0] if need_grad else loss


def _ours(x, t, m, need_grad, inplace=False):
    from lens_kernels import logprobs_and_confidence

    out = logprobs_and_confidence(x, t, m, inplace_backward=inplace)
    return torch.autograd.grad(out.logprob_sum.sum(), x)[0] if need_grad else out.logprob_sum


def _ours_inplace(x, t, m, need_grad):
    return _ours(x, t, m, need_grad, inplace=True)


def _ours_omp(x, t, m, need_grad):
    """CPU path run inline with torch's OpenMP per op (LENS_KERNELS_CPU_WORKERS=1)."""
    old = os.environ.get("LENS_KERNELS_CPU_WORKERS")
    os.environ["LENS_KERNELS_CPU_WORKERS"] = "1"
    try:
        return _ours(x, t, m, need_grad)
    finally:
        if old is None:
            del os.environ["LENS_KERNELS_CPU_WORKERS"]
        else:
            os.environ["LENS_KERNELS_CPU_WORKERS"] = old


def _liger(x, t, m, need_grad):
    from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss

    flat_t = torch.where(m.bool(), t, torch.full_like(t, -100)).reshape(-1)
    loss = -LigerCrossEntropyLoss(reduction="sum")(x.reshape(-1, x.shape[-1]), flat_t)
    return torch.autograd.grad(loss, x)[0] if need_grad else loss


STEPS = {"naive": _naive, "megatron": _megatron, "ours": _ours, "ours_inplace": _ours_inplace,
         "ours_omp": _ours_omp, "liger": _liger}


def available_variants(device: str, wanted) -> list[str]:
    """The wanted variants that can run here (Liger needs its package and a GPU)."""
    names = []
    for name in wanted:
        if name == "ours_omp" and device != "cpu":
            continue
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
    """A 1-process group + TP=1 model-parallel state (megatron reads the TP group globally).

    On CPU no torch.cuda workaround was needed for vocab_parallel_cross_entropy
    (megatron-core 0.16.1): it allocates on the logits' device.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        import socket

        with socket.socket() as sock:          # a free port (memory workers run beside us)
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)


def make_inputs(n: int, v: int, dtype: torch.dtype, device: str, seed: int = 0):
    """Logits ``[1, n, v]`` filled in row chunks (no full-size temporaries), targets, mask."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.empty(1, n, v, dtype=dtype, device=device)
    step = max(1, (64 << 20) // (4 * v))
    for r0 in range(0, n, step):
        x[0, r0:r0 + step].normal_(generator=gen).mul_(3.0)
    t = torch.randint(0, v, (1, n), generator=gen, device=device)
    m = torch.ones(1, n, dtype=torch.bool, device=device)
    return x, t, m


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- timing
def _timed_call(step, base, t, m, device, need_grad):
    x = base.clone().requires_grad_(need_grad)
    _sync(device)
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.set_grad_enabled(need_grad):
            out = step(x, t, m, need_grad)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end), out
    t0 = time.perf_counter()
    with torch.set_grad_enabled(need_grad):
        out = step(x, t, m, need_grad)
    return (time.perf_counter() - t0) * 1e3, out


def time_variants(names, base, t, m, device, repeats, warmup, need_grad):
    """Interleaved timing; returns ``{name: [ms, ...]}`` (OOM → empty list)."""
    times = {n: [] for n in names}
    failed = set()
    for rnd in range(warmup + repeats):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for name in order:
            if name in failed:
                continue
            try:
                ms, out = _timed_call(STEPS[name], base, t, m, device, need_grad)
            except torch.OutOfMemoryError:
                failed.add(name)
                times[name] = []
                continue
            del out
            if rnd >= warmup:
                times[name].append(ms)
    return times


# ----------------------------------------------------------------------------- memory
def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def memory_worker(name, dtype_name, n, v, need_grad) -> dict:
    """Run one variant once in this (fresh) process and report its peak extra memory."""
    device = "cpu"
    if name == "megatron":
        setup_megatron(device)
    base, t, m = make_inputs(n, v, DTYPES[dtype_name], device)
    x = base.requires_grad_(need_grad)
    rss_before = _proc_status_kib("VmRSS")
    method = "VmHWM after clear_refs=5"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        import resource

        method = "ru_maxrss delta (fresh process)"
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.set_grad_enabled(need_grad):
        out = STEPS[name](x, t, m, need_grad)
    peak = _proc_status_kib("VmHWM")
    del out
    return {"extra_bytes": (peak - rss_before) * 1024, "method": method}


def measure_memory(name, dtype_name, n, v, device, need_grad) -> dict:
    """Peak extra memory of one call: fresh subprocess on CPU, allocator stats on GPU."""
    logits_bytes = n * v * DTYPES[dtype_name].itemsize
    if device == "cuda":
        base, t, m = make_inputs(n, v, DTYPES[dtype_name], device)
        x = base.requires_grad_(need_grad)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        try:
            with torch.set_grad_enabled(need_grad):
                out = STEPS[name](x, t, m, need_grad)
            torch.cuda.synchronize()
            extra = torch.cuda.max_memory_allocated() - before
            del out
        except torch.OutOfMemoryError:
            return {"extra_bytes": None, "ratio": None, "method": "OOM"}
        res = {"extra_bytes": extra, "method": "torch.cuda.max_memory_allocated delta"}
    else:
        cmd = [sys.executable, __file__, "--memory-worker", name, dtype_name, str(n), str(v),
               str(int(need_grad))]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["ratio"] = res["extra_bytes"] / logits_bytes
    return res


# ----------------------------------------------------------------------------- model
def bytes_model(n: int, v: int, itemsize: int) -> dict:
    """Bytes the Triton kernels move vs the HBM floor (a model, not a measurement).

    Floor: forward must read the logits once; backward must read them once and write the
    gradient once. The kernels add only per-row scalars (targets, mask, stats, lse, coefs).
    """
    logits = n * v * itemsize
    fwd_rows = n * (8 + 1 + 16)                 # target id, mask byte, packed stats out
    bwd_rows = n * (8 + 4 + 4)                  # target id, lse, coefficient
    rows = {
        "forward_floor": logits, "forward_kernel": logits + fwd_rows,
        "backward_floor": 2 * logits, "backward_kernel": 2 * logits + bwd_rows,
    }
    return {k: {"bytes": b, "ms_at_nominal_3.35TB/s": b / H100_HBM_BYTES_PER_S * 1e3}
            for k, b in rows.items()}


# ----------------------------------------------------------------------------- report
def _median(xs):
    return statistics.median(xs) if xs else None


def run_config(n, v, dtype_name, device, names, args) -> dict:
    base, t, m = make_inputs(n, v, DTYPES[dtype_name], device)
    load = os.getloadavg()
    fb = time_variants(names, base, t, m, device, args.repeats, args.warmup, need_grad=True)
    fwd = time_variants(names, base, t, m, device, args.repeats, args.warmup, need_grad=False)
    del base
    result = {"shape": [n, v], "dtype": dtype_name, "loadavg_before": load,
              "loadavg_after": os.getloadavg(), "variants": {}}
    meg = _median(fb.get("megatron", []))
    for name in names:
        entry = {"fwd_bwd_ms": _median(fb[name]), "fwd_ms": _median(fwd[name]),
                 "fwd_bwd_samples_ms": [round(x, 2) for x in fb[name]]}
        if meg and entry["fwd_bwd_ms"]:
            entry["speedup_vs_megatron"] = meg / entry["fwd_bwd_ms"]
        if not args.no_memory:
            entry["mem_fwd_bwd"] = measure_memory(name, dtype_name, n, v, device, True)
            entry["mem_fwd_only"] = measure_memory(name, dtype_name, n, v, device, False)
        result["variants"][name] = entry
    result["bytes_model"] = bytes_model(n, v, DTYPES[dtype_name].itemsize)
    return result


def _fmt(x, spec=".1f"):
    return "—" if x is None else format(x, spec)


def print_table(res: dict) -> None:
    n, v = res["shape"]
    print(f"\n[{n} x {v}] {res['dtype']}   (load average {res['loadavg_before'][0]:.1f} → "
          f"{res['loadavg_after'][0]:.1f})")
    print(f"{'variant':14} {'fwd+bwd ms':>11} {'fwd ms':>8} {'vs megatron':>12} "
          f"{'mem fwd+bwd':>12} {'mem fwd':>8}")
    for name, e in res["variants"].items():
        mem = e.get("mem_fwd_bwd", {}).get("ratio")
        memf = e.get("mem_fwd_only", {}).get("ratio")
        print(f"{name:14} {_fmt(e['fwd_bwd_ms']):>11} {_fmt(e['fwd_ms']):>8} "
              f"{_fmt(e.get('speedup_vs_megatron'), '.2f') + 'x':>12} "
              f"{_fmt(mem, '.2f') + 'x':>12} {_fmt(memf, '.2f') + 'x':>8}")
    print("bytes-moved MODEL of the Triton kernels (not a measurement; H100 HBM 3.35 TB/s nominal):")
    for k, e in res["bytes_model"].items():
        print(f"  {k:16} {e['bytes'] / 1e9:8.3f} GB  {e['ms_at_nominal_3.35TB/s']:7.3f} ms")


def print_model(shapes, dtypes) -> None:
    """The bytes-moved model alone (no GPU needed): a MODEL, not a measurement."""
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
    parser.add_argument("--variants", nargs="+", default=list(ALL_VARIANTS), choices=ALL_VARIANTS)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--model-only", action="store_true",
                        help="print only the bytes-moved model for the chosen shapes")
    parser.add_argument("--memory-worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_worker:
        name, dtype_name, n, v, grad = args.memory_worker
        print(json.dumps(memory_worker(name, dtype_name, int(n), int(v), bool(int(grad)))))
        return
    device = "cuda" if args.gpu else "cpu"
    shapes = args.shape or ([[32768, 128256], [16384, 151936]] if args.gpu else [[4096, 32000]])
    dtypes = args.dtypes or (["bf16"] if args.gpu else ["fp32", "bf16"])
    if args.model_only:
        print_model(shapes, dtypes)
        return
    names = available_variants(device, args.variants)
    if "megatron" in names:
        setup_megatron(device)
    import triton

    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "machine": platform.node(), "cpu_threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if args.gpu else platform.processor() or "cpu",
            "torch": torch.__version__, "triton": triton.__version__,
            "repeats": args.repeats, "warmup": args.warmup}
    results = [run_config(n, v, d, device, names, args) for n, v in shapes for d in dtypes]
    for res in results:
        print_table(res)
    payload = {"meta": meta, "results": results}
    print("\nJSON:", json.dumps(payload))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)


if __name__ == "__main__":
    main()
