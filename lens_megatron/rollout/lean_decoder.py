"""A lean KV-cached decoder over the actor's own parameter tensors, for TP = PP = 1.

Generation is one forward per new token; at small and medium sizes the cost of a megatron
forward is dominated by fixed per-call work (dozens of module calls, tensor-parallel no-op
autograd functions, RoPE cos/sin recomputed in every layer for every cached key), and
megatron's static KV cache gives RoPE positions per cache *slot*, so prompts of different
lengths cannot share a batch. This decoder runs the same network (Llama/Qwen2: RMSNorm,
fused per-KV-group QKV with optional bias, RoPE with our frequencies, GQA attention, SwiGLU,
untied or tied LM head) directly on the parameters megatron holds — no copy, so it is always
in sync with training — with left-padded batches, per-row positions, a preallocated cache and
cos/sin tables computed once per call. Its logits equal megatron's forward to float rounding
(tested); with TP or PP > 1 the sampler uses the megatron path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.arch import ModelArch, rope_inv_freq
from ..models.sharding import iter_canonical_parameters


class LeanDecoder:
    """``prefill(ids, lengths)`` then ``step(tokens)``; both return fp32 logits ``[b, V]``."""

    def __init__(self, chunks: list, arch: ModelArch, eps: float) -> None:
        if len(chunks) != 1:
            raise ValueError("the lean decoder needs the whole model in one chunk (PP = 1)")
        self.arch, self.eps = arch, eps
        self.p = {name: param for _, name, param in
                  iter_canonical_parameters(chunks, arch.tie_word_embeddings)}
        self.lm_head = self.p.get("output_layer.weight", self.p["embedding.word_embeddings.weight"])
        # Every buffer (RoPE tables, KV cache, masks, positions) lives with the parameters.
        self.device = self.lm_head.device
        self.inv_freq = rope_inv_freq(arch).to(self.device)

    # ------------------------------------------------------------------ building blocks
    def _layer(self, i: int, name: str) -> torch.Tensor:
        return self.p[f"decoder.layers.{i}.{name}"]

    def _rope_tables(self, max_len: int, dtype) -> None:
        positions = torch.arange(max_len, dtype=torch.float32, device=self.device)
        freqs = torch.outer(positions, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = emb.cos().to(dtype), emb.sin().to(dtype)

    def _rope_for(self, positions: torch.Tensor):
        """cos, sin ``[b, s, 1, 1, d]`` for ``positions [b, s]``: gathered once per forward,
        shared by every layer (the fused QKV view is ``[b, s, groups, slots, d]``)."""
        return self.cos[positions][:, :, None, None], self.sin[positions][:, :, None, None]

    def _qkv(self, i: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """h [b, s, H] -> rotated q [b, nq, s, d], rotated k and v [b, nkv, s, d] from the
        fused per-KV-group QKV layout; q and k are rotated together, in one pass over the
        group's first ``per_group + 1`` slots (megatron's non-interleaved RoPE)."""
        a = self.arch
        d, groups = a.head_dim, a.num_query_groups
        per_group = a.num_attention_heads // groups
        bias = self.p.get(f"decoder.layers.{i}.self_attention.linear_qkv.bias")
        qkv = F.linear(h, self._layer(i, "self_attention.linear_qkv.weight"), bias)
        b, s, _ = qkv.shape
        qkv = qkv.view(b, s, groups, per_group + 2, d)
        qk = qkv[:, :, :, : per_group + 1]
        half = d // 2
        qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin
        q = qk[:, :, :, :per_group].reshape(b, s, groups * per_group, d).transpose(1, 2)
        k = qk[:, :, :, per_group].transpose(1, 2)
        v = qkv[:, :, :, per_group + 1].transpose(1, 2)
        return q, k, v

    def _block(self, i: int, x: torch.Tensor, rope: tuple, keep: torch.Tensor):
        norm = F.rms_norm(x, (x.shape[-1],), self._layer(i, "input_layernorm.weight"), self.eps)
        q, k, v = self._qkv(i, norm, *rope)
        start, end = self.length, self.length + x.shape[1]
        self.k_cache[i][:, :, start:end], self.v_cache[i][:, :, start:end] = k, v
        attn = F.scaled_dot_product_attention(
            q, self.k_cache[i][:, :, :end], self.v_cache[i][:, :, :end], attn_mask=keep,
            enable_gqa=q.shape[1] != k.shape[1])
        attn = attn.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        x = x + F.linear(attn, self._layer(i, "self_attention.linear_proj.weight"))
        norm = F.rms_norm(x, (x.shape[-1],), self._layer(i, "pre_mlp_layernorm.weight"), self.eps)
        gate, up = F.linear(norm, self._layer(i, "mlp.linear_fc1.weight")).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, self._layer(i, "mlp.linear_fc2.weight"))

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor):
        x = F.embedding(ids, self.p["embedding.word_embeddings.weight"])
        rope = self._rope_for(positions)
        for i in range(self.arch.num_layers):
            x = self._block(i, x, rope, keep)
        x = F.rms_norm(x[:, -1:], (x.shape[-1],), self.p["decoder.final_layernorm.weight"],
                       self.eps)
        self.length += ids.shape[1]
        return F.linear(x[:, 0], self.lm_head)[:, : self.arch.vocab_size].float()

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, lengths: torch.Tensor, max_new_tokens: int):
        """``ids [b, L]`` left-padded prompts of ``lengths`` (both on the parameters' device);
        returns next-token logits."""
        b, width = ids.shape
        a, dtype = self.arch, self.lm_head.dtype
        total = width + max_new_tokens
        self._rope_tables(total, dtype)
        shape = (b, a.num_query_groups, total, a.head_dim)
        self.k_cache = [torch.empty(shape, dtype=dtype, device=self.device)
                        for _ in range(a.num_layers)]
        self.v_cache = [torch.empty(shape, dtype=dtype, device=self.device)
                        for _ in range(a.num_layers)]
        self.length = 0
        self.pad = (width - lengths).unsqueeze(1)  # [b, 1]
        slots = torch.arange(width, device=self.device).unsqueeze(0)
        positions = (slots - self.pad).clamp(min=0)
        causal = slots.T >= slots  # [L(query), L(key)]
        keep = causal.unsqueeze(0) & (slots >= self.pad).unsqueeze(1)  # [b, L, L]
        keep = keep | torch.eye(width, dtype=torch.bool, device=self.device)  # pad queries: self
        self.next_position = lengths.clone()
        return self._forward(ids, positions, keep.unsqueeze(1))

    @torch.no_grad()
    def step(self, tokens: torch.Tensor):
        """Append ``tokens [b]``; returns the logits for the token after them."""
        end = self.length + 1
        keep = (torch.arange(end, device=self.device).unsqueeze(0) >= self.pad).view(
            tokens.shape[0], 1, 1, end)
        positions = self.next_position.unsqueeze(1)
        self.next_position = self.next_position + 1
        return self._forward(tokens.view(-1, 1), positions, keep)
