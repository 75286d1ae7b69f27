"""megatron's ``PackedSeqParams`` for a packed micro-batch (``batching.layout.PackedMicroBatch``).

What megatron-core 0.16 does with them (read in ``transformer/attention.py`` and
``models/common/embeddings/rope_utils.py``), and so what the layout provides:

- ``GPTModel`` computes the RoPE table for ``max(max_seqlen_q, max_seqlen_kv)`` positions and,
  under THD, applies it per segment of ``cu_seqlens_*_padded`` (else ``cu_seqlens_*``) with
  ``torch.split``: the segments must tile the packed length T exactly, and each must fit the
  table — hence ``cu_seqlens_padded`` ending at T and ``max_seqlen`` = the longest padded
  segment. Positions restart at 0 per segment; ``position_ids`` are not read for RoPE.
  (A table of exactly T rows switches megatron to "absolute offsets" mode, positions
  ``cu_seqlens[i] + j``; that coincides with per-document positions only for one segment,
  which is the only case where the longest segment is T.)
- ``Attention.forward`` squeezes the batch dimension: core attention gets ``[T, heads, d]``;
  under sequence parallelism the QKV projection has already gathered the full T, so T must be
  a multiple of TP (the plan's ``pad_multiple``).
- Transformer Engine reads ``cu_seqlens_q/kv`` (real tokens) and ``cu_seqlens_*_padded``
  (offsets) and switches the mask to ``padding_causal`` itself.
"""
from __future__ import annotations

from megatron.core.packed_seq_params import PackedSeqParams

__all__ = ["packed_seq_params"]


def packed_seq_params(micro_batch) -> PackedSeqParams:
    """THD parameters of a ``PackedMicroBatch`` (tensors on the micro-batch's device)."""
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=micro_batch.cu_seqlens,
        cu_seqlens_kv=micro_batch.cu_seqlens,
        cu_seqlens_q_padded=micro_batch.cu_seqlens_padded,
        cu_seqlens_kv_padded=micro_batch.cu_seqlens_padded,
        max_seqlen_q=int(micro_batch.max_seqlen),
        max_seqlen_kv=int(micro_batch.max_seqlen),
    )
