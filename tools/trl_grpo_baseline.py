"""Hugging Face TRL ``GRPOTrainer`` baseline for ``tools/bench_vs_trl.py``.

Runs under a separate venv that has ``trl`` installed (it must not import lens_megatron):

    /work/venv-trl/bin/python tools/trl_grpo_baseline.py --steps 8 --out /tmp/trl.jsonl

It builds, locally and at random (no downloads), a ``Qwen2ForCausalLM`` of the same shape as
lens-megatron's tiny default (hidden 128, intermediate 512, 2 layers, 2 heads, 2 KV heads,
vocab 128, untied embeddings, qkv bias, fp32) and a character-level tokenizer like ours
(<pad>=0, <bos>=1, <eos>=2, then ``string.printable``), trains GRPO on the same arithmetic
prompts (``12+35=``) with an exact-match ``\\boxed{}`` reward, and writes one JSON line per
optimizer step:

- ``step_s``: ``on_step_begin`` -> ``on_step_end`` of a ``TrainerCallback`` (generation,
  reward, loss forward/backward, optimizer step; HF's own logging is outside);
- ``step_wall_s``: ``on_step_end`` -> next ``on_step_end`` (includes the dataloader and
  Trainer logging between steps);
- ``generate_s``: ``model.generate`` (TRL's ``transformers.generate`` profiling block);
- ``reward_s``: the reward function; ``prepare_s``: TRL's whole
  ``_generate_and_score_completions`` (generation + reward + advantages + bookkeeping);
- ``train_s``: ``step_s - prepare_s`` (loss forward/backward + clip + optimizer);
- ``completion_len_mean`` / ``completion_tokens``: generated tokens (after TRL's EOS mask);
- ``generate_use_cache``: the ``use_cache`` that ``generate`` ran with;
  ``generate_forwards`` / ``generate_one_token_forwards``: cumulative forward calls inside
  ``generate`` and how many fed one token per sequence (KV-cached decode: all but the
  prefill of each ``generate``).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import string
import sys
import tempfile
import time


def arithmetic_problems(count: int, seed: int) -> list[tuple[str, str]]:
    """Same distribution as lens_megatron.data.arithmetic (re-implemented, not imported)."""
    rng = random.Random(seed)
    seen, out = set(), []
    while len(out) < count:
        kind = rng.random()
        if kind < 0.3:
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            text, ans = f"{a}+{b}", a + b
        elif kind < 0.6:
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            text, ans = f"{a}+{b}", a + b
        elif kind < 0.85:
            a, b, c = rng.randint(1, 30), rng.randint(1, 30), rng.randint(1, 30)
            text, ans = f"{a}+{b}+{c}", a + b + c
        else:
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            text, ans = f"{a}*{b}", a * b
        if text in seen:
            continue
        seen.add(text)
        out.append((text + "=", str(ans)))
    return out


def build_char_tokenizer(path: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in string.printable:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 1)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                 eos_token="<eos>", padding_side="left")
    hf.save_pretrained(path)
    return hf


def build_model(path: str, args):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(args.seed)
    config = Qwen2Config(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size,
        intermediate_size=args.ffn_hidden_size, num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads, num_key_value_heads=args.num_kv_heads,
        max_position_embeddings=args.max_positions, rope_theta=10000.0,
        tie_word_embeddings=args.tie_word_embeddings, use_cache=True, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, torch_dtype="float32")
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(path)
    return model


BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8, help="optimizer steps (warm-up included)")
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=0,
                   help="sequences per forward/backward (0: the whole step's batch, "
                        "gradient_accumulation_steps=1)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="always generate max_new_tokens (generation_kwargs min_new_tokens)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--ffn-hidden-size", type=int, default=512)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--num-heads", type=int, default=2)
    p.add_argument("--num-kv-heads", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=128)
    p.add_argument("--max-positions", type=int, default=128)
    p.add_argument("--tie-word-embeddings", action="store_true")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--out", required=True, help="JSONL file: one line per optimizer step")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    import transformers
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.extras import profiling

    work = args.workdir or tempfile.mkdtemp(prefix="trl_grpo_")
    model_dir = os.path.join(work, "model")
    tokenizer = build_char_tokenizer(model_dir)
    model = build_model(model_dir, args)

    n_seq = args.prompts_per_step * args.group_size
    micro = args.micro_batch or n_seq
    if n_seq % micro:
        raise SystemExit(f"--micro-batch {micro} must divide {n_seq}")
    problems = arithmetic_problems(args.steps * args.prompts_per_step + 64, args.seed)
    dataset = Dataset.from_dict({"prompt": [q for q, _ in problems],
                                 "answer": [a for _, a in problems]})

    reward_times: list[float] = []

    def boxed_exact_match(completions, answer, **kwargs):
        t0 = time.perf_counter()
        out = []
        for text, gold in zip(completions, answer):
            m = BOXED.search(text)
            out.append(1.0 if m and m.group(1).strip() == gold else 0.0)
        reward_times.append(time.perf_counter() - t0)
        return out

    generation_kwargs = {"use_cache": True}
    if args.ignore_eos:
        generation_kwargs["min_new_tokens"] = args.max_new_tokens
    config = GRPOConfig(
        output_dir=os.path.join(work, "out"),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=n_seq // micro,
        generation_batch_size=n_seq,
        num_generations=args.group_size,
        max_completion_length=args.max_new_tokens,
        temperature=1.0, top_p=1.0, top_k=0,
        use_vllm=False, use_cpu=True, bf16=False, fp16=False,
        beta=0.0, num_iterations=1, learning_rate=args.lr, max_grad_norm=1.0,
        max_steps=args.steps, logging_steps=1, report_to=[], save_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, seed=args.seed, shuffle_dataset=False,
        log_completions=False, generation_kwargs=generation_kwargs,
    )

    # TRL's profiling blocks time generate and the reward; it only forwards them to wandb/mlflow,
    # so collect them here.
    profiled: dict[str, list[float]] = {}

    def _collect(self, duration):
        profiled.setdefault(self.name.split(".", 1)[-1], []).append(duration)

    profiling.ProfilingContext._log_metrics = _collect

    trainer = GRPOTrainer(model=model, reward_funcs=boxed_exact_match, args=config,
                          train_dataset=dataset, processing_class=tokenizer)

    prepare_times: list[float] = []
    completion_lengths: list[list[int]] = []
    inner = trainer._generate_and_score_completions

    def timed_prepare(inputs):
        t0 = time.perf_counter()
        out = inner(inputs)
        prepare_times.append(time.perf_counter() - t0)
        completion_lengths.append(out["completion_mask"].sum(1).tolist())
        return out

    trainer._generate_and_score_completions = timed_prepare

    gen_cfg = trainer.generation_config
    use_cache = getattr(gen_cfg, "use_cache", None)
    generate_use_cache = []
    model_generate = trainer.model.generate

    def checked_generate(*a, **kw):
        cfg = kw.get("generation_config")
        generate_use_cache.append(bool(getattr(cfg, "use_cache", True) is not False
                                       and kw.get("use_cache", True) is not False))
        return model_generate(*a, **kw)

    trainer.model.generate = checked_generate

    # Proof that decoding is KV-cached: count forward calls made inside generate by their
    # input length (a cached decode step feeds exactly one new token per sequence).
    decode_calls = {"in_generate": 0, "one_token": 0}
    in_generate = [False]

    def count_forward(module, a, kw):
        if in_generate[0]:
            ids = kw.get("input_ids", a[0] if a else None)
            decode_calls["in_generate"] += 1
            decode_calls["one_token"] += int(ids is not None and ids.shape[1] == 1)

    trainer.model.register_forward_pre_hook(count_forward, with_kwargs=True)

    def flagged_generate(*a, **kw):
        in_generate[0] = True
        try:
            return checked_generate(*a, **kw)
        finally:
            in_generate[0] = False

    trainer.model.generate = flagged_generate

    records = []
    out = open(args.out, "w", encoding="utf-8")

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.t_begin = None
            self.t_prev_end = None
            self.gen_seen = 0
            self.rew_seen = 0
            self.prep_seen = 0

        def on_step_begin(self, a, state, control, **kw):
            self.t_begin = time.perf_counter()
            self.gen_seen = len(profiled.get("transformers.generate", []))
            self.rew_seen = len(reward_times)
            self.prep_seen = len(prepare_times)

        def on_step_end(self, a, state, control, **kw):
            now = time.perf_counter()
            gen = profiled.get("transformers.generate", [])[self.gen_seen:]
            prep = prepare_times[self.prep_seen:]
            lens = [n for batch in completion_lengths[self.prep_seen:] for n in batch]
            rec = {
                "step": state.global_step,
                "step_s": now - self.t_begin,
                "step_wall_s": None if self.t_prev_end is None else now - self.t_prev_end,
                "generate_s": sum(gen),
                "reward_s": sum(reward_times[self.rew_seen:]),
                "prepare_s": sum(prep),
                "train_s": (now - self.t_begin) - sum(prep),
                "completion_tokens": sum(lens),
                "completion_len_mean": sum(lens) / max(len(lens), 1),
                "sequences": len(lens),
                "generate_use_cache": all(generate_use_cache) if generate_use_cache else None,
                "generate_forwards": decode_calls["in_generate"],
                "generate_one_token_forwards": decode_calls["one_token"],
            }
            self.t_prev_end = now
            records.append(rec)
            out.write(json.dumps(rec) + "\n")
            out.flush()

    trainer.add_callback(StepTimer())
    header = {"meta": True, "torch": torch.__version__, "trl": trl.__version__,
              "transformers": transformers.__version__, "threads": torch.get_num_threads(),
              "generation_config_use_cache": use_cache,
              "model_config_use_cache": trainer.model.config.use_cache,
              "params": sum(p.numel() for p in trainer.model.parameters()),
              "micro_batch": micro, "gradient_accumulation_steps": n_seq // micro,
              "generation_kwargs": trainer.generation_kwargs.__repr__()}
    print(json.dumps(header), file=sys.stderr)
    out.write(json.dumps(header) + "\n")
    trainer.train()
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
