"""Tiny Hugging Face models and a tokenizer built locally (no downloads) for tests and benchmarks.

``build_tiny_model(directory, family="qwen2")`` writes ``config.json``, ``model.safetensors``,
``generation_config.json`` and a byte-level BPE tokenizer into ``directory`` and returns a
``TinyModel`` (paths, ids, the transformers model). Shapes default to what vLLM's CPU backend
accepts (head_dim 64) while staying small: hidden 128, 2 heads, 2 layers, a vocabulary of ~300.

``eos_logit_boost`` gives the EOS token a roughly constant logit advantage so that sampled
responses sometimes end with EOS and sometimes hit the length limit (random tiny models are
otherwise almost uniform over the vocabulary, so EOS would almost never be drawn).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"

_CORPUS = [
    "What is 2 + 3? The answer is 5.",
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "Let x be a number such that x * 4 = 12. Then x = 3.",
    "The sum of the first ten positive integers is 55.",
    "We compute 7 - 2 = 5, so the result is \\boxed{5}.",
]


@dataclass
class TinyModel:
    """What a test needs to know about a tiny model written to ``path``."""

    path: Path
    model: torch.nn.Module  # the transformers model (fp32, eval mode)
    tokenizer: object
    eos_id: int
    pad_id: int
    vocab_size: int


def build_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on a few lines of text (offline, deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN, BOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, bos_token=BOS_TOKEN,
        model_max_length=1024,
    )


def _config(family: str, vocab: int, eos_id: int, pad_id: int, bos_id: int, **sizes):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab, hidden_size=sizes.get("hidden_size", 128),
        intermediate_size=sizes.get("intermediate_size", 256),
        num_hidden_layers=sizes.get("num_layers", 2),
        num_attention_heads=sizes.get("num_heads", 2),
        num_key_value_heads=sizes.get("num_kv_heads", 2),
        head_dim=sizes.get("hidden_size", 128) // sizes.get("num_heads", 2),
        max_position_embeddings=sizes.get("max_positions", 512), rms_norm_eps=1e-6,
        rope_theta=10000.0, tie_word_embeddings=sizes.get("tie_embeddings", False), eos_token_id=eos_id,
        pad_token_id=pad_id, bos_token_id=bos_id, torch_dtype="float32",
    )
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "llama":
        return LlamaConfig(attention_bias=False, mlp_bias=False, **common)
    raise ValueError(f"family must be 'qwen2' or 'llama', got {family!r}")


@torch.no_grad()
def _boost_eos(model: torch.nn.Module, eos_id: int, boost: float) -> None:
    """Make hidden dimension 0 dominate the residual stream and let only EOS read it."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    embed[:, 0] = 4.0
    head[:, 0] = 0.0
    head[eos_id, 0] = boost / math.sqrt(embed.shape[1])


def build_tiny_model(directory: str | Path, family: str = "qwen2", seed: int = 0,
                     eos_logit_boost: float = 0.0, **sizes) -> TinyModel:
    """Build, save (safetensors, fp32) and return a tiny random ``family`` model + tokenizer.

    ``sizes``: hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads,
    max_positions, tie_embeddings (defaults: 128, 256, 2, 2, 2, 512, False).
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(sizes.pop("vocab_size", 300))
    eos_id, pad_id, bos_id = (tokenizer.convert_tokens_to_ids(t)
                              for t in (EOS_TOKEN, PAD_TOKEN, BOS_TOKEN))
    config = _config(family, len(tokenizer), eos_id, pad_id, bos_id, **sizes)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if eos_logit_boost:
        _boost_eos(model, eos_id, eos_logit_boost)
    model.eval()
    model.save_pretrained(path, safe_serialization=True)
    GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=bos_id).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return TinyModel(path=path, model=model, tokenizer=tokenizer, eos_id=eos_id, pad_id=pad_id,
                     vocab_size=len(tokenizer))


@torch.no_grad()
def continuation_logprobs(model: torch.nn.Module, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    """transformers' fp32 log-probs of ``continuation`` given ``prompt`` (one value per token)."""
    ids = torch.tensor([prompt + continuation], dtype=torch.int64)
    logits = model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    start = len(prompt)
    targets = ids[0, start:]
    return logp[start - 1:-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1)
