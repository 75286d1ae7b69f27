"""megatron-core GPTModel at context_parallel_size=2 on CPU (gloo, local spec with
``ContextParallelSDPAttention`` patched in): fed this rank's load-balanced split, its logits
gathered back equal the CP=1 logits, and one optimizer step through megatron's DDP (gradients
summed over the data-parallel x context-parallel group) gives the CP=1 gradient norm and weights.
Layouts: CP=2, CP=2 x TP=2, CP=2 x TP=2 with sequence parallelism, CP=2 x DP=2."""
from __future__ import annotations

import warnings

import pytest
import torch

from lens_megatron.parallel import context as cp_layout
from lens_megatron.parallel.spawn import run_in_processes
from megatron_helpers import tiny_arch

pytestmark = pytest.mark.slow

SEQ = 24  # not a power of two; a multiple of 2*CP*TP = 8
BATCH = 2
MICRO_BATCHES = 2


def _setup(tp: int, cp: int, dp: int, sp: bool, family: str):
    """Megatron's groups and this rank's model; under CP the two integration patches."""
    warnings.filterwarnings("ignore")
    from lens_megatron.models.arch import ParallelLayout, Precision
    from lens_megatron.models.builder import build_model_chunks
    from lens_megatron.parallel.initialize import initialize_model_parallel

    if cp > 1:
        from megatron.core.models.common.embeddings import rotary_pos_embedding

        from lens_megatron.models import layer_spec
        from lens_megatron.models.context_attention import ContextParallelSDPAttention

        # layer_spec.py's local spec under CP (the lead's integration, CP_NOTES.md)
        layer_spec.SDPACoreAttention = ContextParallelSDPAttention
        # megatron's RoPE slicing allocates pinned memory, which needs CUDA (cpu_mode.py's job)
        rotary_pos_embedding.get_pos_emb_on_this_cp_rank = cp_layout.rope_for_rank
    initialize_model_parallel(tp, 1, None, cp)
    arch = tiny_arch(family)
    layout = ParallelLayout(tp, 1, None, sequence_parallel=sp, context_parallel_size=cp)
    return arch, build_model_chunks(arch, layout, Precision("fp32"), "local", seed=7)


def _batches(vocab: int):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (BATCH, SEQ), generator=g) for _ in range(MICRO_BATCHES)]


def _local(ids: torch.Tensor) -> dict:
    """This CP rank's split of the ids, their global next-token targets and the valid mask."""
    from megatron.core import parallel_state as ps

    rank, size = ps.get_context_parallel_rank(), ps.get_context_parallel_world_size()
    targets = torch.roll(ids, -1, dims=1)  # shifted globally, *then* split
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[:, -1] = False
    split = lambda t: cp_layout.split_for_rank(t, rank, size)  # noqa: E731
    positions = cp_layout.local_positions(SEQ, rank, size).expand(ids.shape[0], -1)
    return {"ids": split(ids), "positions": positions, "targets": split(targets),
            "valid": split(valid)}


def _run(chunks, batches, step, forward_only):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from lens_megatron.parallel import cpu_mode

    with cpu_mode.cuda_to_cpu():
        return get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter(batches), model=chunks[0],
            num_microbatches=len(batches), seq_length=SEQ,  # global: megatron divides by CP
            micro_batch_size=BATCH, forward_only=forward_only)


def _masked_vocab(logits, vocab_size):
    from megatron.core import parallel_state as ps

    local_vocab = logits.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * local_vocab
    padded = torch.arange(start, start + local_vocab) >= vocab_size
    return logits.float().masked_fill(padded, -1e4).contiguous()


def cp_worker(tp: int, cp: int, dp: int, sp: bool, family: str):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import (
        gather_from_tensor_model_parallel_region,
        vocab_parallel_cross_entropy,
    )

    from lens_megatron.config import ModelConfig, OptimConfig
    from lens_megatron.models.gather import gather_full_state_dict
    from lens_megatron.optimizer import optimizer_step, setup_training, zero_grads

    arch, chunks = _setup(tp, cp, dp, sp, family)
    all_batches = _batches(arch.vocab_size)
    global_tokens = sum(b[:, :-1].numel() for b in all_batches)
    per_dp = MICRO_BATCHES // dp
    dp_rank = ps.get_data_parallel_rank()
    batches = [_local(b) for b in all_batches[dp_rank * per_dp:(dp_rank + 1) * per_dp]]
    cp_group = ps.get_context_parallel_group()

    def logits_step(data_iterator, model):
        mb = next(data_iterator)
        output = model(mb["ids"], mb["positions"], None)

        def collect(logits):
            full = gather_from_tensor_model_parallel_region(logits)[..., :arch.vocab_size]
            full = cp_layout.gather_from_ranks(full, cp_group, seq_dim=1)
            return logits.sum() * 0.0, torch.zeros((), dtype=torch.int), {"logits": full}

        return output, collect

    logits = torch.cat([r["logits"] for r in _run(chunks, batches, logits_step, True)])

    model_cfg = ModelConfig(arch=arch, micro_batch_size=BATCH)
    optim_cfg = OptimConfig(lr=0.1, adam_eps=1.0, clip_grad=0.0, use_distributed_optimizer=dp > 1)
    training = setup_training(chunks, model_cfg, optim_cfg, total_steps=10)

    def loss_step(data_iterator, model):
        mb = next(data_iterator)
        output = model(mb["ids"], mb["positions"], None)

        def loss_fn(logits):
            ce = vocab_parallel_cross_entropy(_masked_vocab(logits, arch.vocab_size),
                                              mb["targets"])
            loss = (ce * mb["valid"]).sum() / global_tokens  # this rank's share of the loss
            return loss, torch.zeros((), dtype=torch.int), {"loss": loss.detach()}

        return output, loss_fn

    zero_grads(training)
    _run(training.chunks, batches, loss_step, False)
    outcome = optimizer_step(training)
    state = gather_full_state_dict(training.chunks, arch.tie_word_embeddings)
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if name in state:  # vocab padding depends on TP; compare the real rows
            state[name] = state[name][:arch.vocab_size]
    if torch.distributed.get_rank() != 0:
        return None
    return {"logits": logits, "rows": (0, per_dp * BATCH),  # rank 0 is DP rank 0
            "grad_norm": outcome.grad_norm, "state": state,
            "dp_cp_size": ps.get_data_parallel_world_size(with_context_parallel=True)}


def _compare(got, reference, label):
    start, end = got["rows"]
    expected = reference["logits"][start:end]
    assert got["logits"].shape == expected.shape, label
    torch.testing.assert_close(got["logits"], expected, rtol=1e-5, atol=1e-5,
                               msg=lambda m: f"{label} logits: {m}")
    assert got["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5), label
    for name, value in reference["state"].items():
        torch.testing.assert_close(got["state"][name], value, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{label} {name}: {m}")


LAYOUTS = [  # tp, cp, dp, sequence_parallel (CP=2 x TP=2 with SP: through the actor, weights
    (1, 2, 1, False),  # included, in test_actor_context_parallel)
    (2, 2, 1, False),
    (1, 2, 2, False),
]


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_gpt_model_cp2_equals_cp1(family):
    reference = run_in_processes(cp_worker, 1, (1, 1, 1, False, family))[0]
    assert reference["grad_norm"] > 0
    layouts = LAYOUTS if family == "qwen2" else LAYOUTS[:1]  # one layout for llama (CI budget)
    for tp, cp, dp, sp in layouts:
        got = run_in_processes(cp_worker, tp * cp * dp, (tp, cp, dp, sp, family), timeout=600)[0]
        assert got["dp_cp_size"] == cp * dp
        _compare(got, reference, f"{family} TP={tp} CP={cp} DP={dp} SP={sp}")
