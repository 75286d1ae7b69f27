"""Gumbel-max sampling made a vocabulary chunk at a time equals the one-shot argmax."""
from __future__ import annotations

import torch

from lens_megatron.rollout.megatron_sampler import gumbel_max, gumbel_noise


def test_chunked_gumbel_max_equals_one_shot_argmax():
    g = torch.Generator().manual_seed(0)
    rows = torch.tensor([0, 5, 17, 1 << 20])
    for vocab in (1, 7, 100, 1000):
        logp = torch.log_softmax(torch.randn(4, vocab, generator=g) * 3, -1)
        logp[1, : vocab // 2] = float("-inf")  # a truncated row (top-k / top-p)
        full = torch.argmax(logp + gumbel_noise(9, rows, 4, vocab), dim=-1)
        for chunk in (1, 3, 64, 4096):
            assert torch.equal(gumbel_max(logp, 9, rows, 4, chunk=chunk), full), (vocab, chunk)


def test_noise_columns_offset_matches_the_full_table():
    rows = torch.arange(3)
    full = gumbel_noise(2, rows, 1, 50)
    assert torch.equal(gumbel_noise(2, rows, 1, 20, start=30), full[:, 30:])


def test_ties_keep_the_lowest_token_id():
    logp = torch.zeros(1, 6)
    noise = gumbel_noise(1, torch.tensor([0]), 0, 6)
    logp = -noise  # every score exactly 0: a six-way tie
    assert int(gumbel_max(logp, 1, torch.tensor([0]), 0, chunk=2)) == 0
