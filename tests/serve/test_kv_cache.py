"""The running batch's KV cache (lorakit/serve/kv_cache.py): left padding, joining along the batch, cutting columns."""

from __future__ import annotations

from typing import Any

import torch

from lorakit.serve.kv_cache import concat_caches, joinable, left_pad_cache, new_cache, slice_cache

from .conftest import last_logits


def prefilled(model: torch.nn.Module, ids: list[list[int]]) -> Any:
    """The cache of a forward pass over ``ids`` (rows of one length)."""
    cache = new_cache(model)
    last_logits(model, torch.tensor(ids), cache)
    return cache


def test_a_new_cache_is_not_joinable_until_filled(base_model):
    assert not joinable(new_cache(base_model))
    assert joinable(prefilled(base_model, [[5, 6, 7]]))


def test_caches_pad_join_and_slice(base_model):
    long = prefilled(base_model, [[5, 17, 42, 99, 7]])  # (1, heads, 5, dim) per layer
    short = prefilled(base_model, [[11, 12, 13], [64, 8, 30]])  # (2, heads, 3, dim)
    assert left_pad_cache(long, 5) is long, "a cache as wide as asked stays as it is"
    padded = left_pad_cache(short, 5)
    for new, old in zip(padded.layers, short.layers):
        for tensor, original in ((new.keys, old.keys), (new.values, old.values)):
            assert tensor.shape[2] == 5
            assert not tensor[:, :, :2].any(), "the padding is zeros (the attention mask hides it)"
            torch.testing.assert_close(tensor[:, :, 2:], original)
    joined = concat_caches(long, padded)
    assert joined.get_seq_length() == 5 and joinable(joined)
    for new, first, second in zip(joined.layers, long.layers, padded.layers):
        torch.testing.assert_close(new.keys, torch.cat([first.keys, second.keys]))
        torch.testing.assert_close(new.values, torch.cat([first.values, second.values]))
    cut = slice_cache(joined, 2)
    assert cut.get_seq_length() == 3 and joinable(cut)
    for new, old in zip(cut.layers, joined.layers):
        torch.testing.assert_close(new.keys, old.keys[:, :, 2:])
        torch.testing.assert_close(new.values, old.values[:, :, 2:])
