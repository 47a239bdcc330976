"""Inputs: pair/text shape checks, the one tokenizer call, padding, and the batch plan."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoTokenizer

from bitfit_serve.errors import InvalidInput
from bitfit_serve.inputs import EncodedInput, collate, plan_batches, split_pairs, tokenize


def test_split_pairs_checks_each_input_against_the_task():
    assert split_pairs(["a", "b"], pair=False) == (["a", "b"], None)
    assert split_pairs([["a", "b"], ("c", "d")], pair=True) == (["a", "c"], ["b", "d"])
    with pytest.raises(InvalidInput, match=r"inputs\[7\]: task 'nli' takes text pairs \['p', 'h'\]"):
        split_pairs(["a"], pair=True, task="nli", field_names=("p", "h"), positions=[7])
    with pytest.raises(InvalidInput, match=r"inputs\[1\]: task 'sst2' takes one text per input"):
        split_pairs(["a", ["b", "c"]], pair=False, task="sst2")
    with pytest.raises(InvalidInput, match="takes text pairs"):
        split_pairs([["a", "b", "c"]], pair=True)


def test_tokenize_truncates_and_collate_pads(tiny_bert_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    encoded = tokenize(tokenizer, ["short", "a much longer text " * 20], None, max_length=16)
    assert len(encoded[1]) == 16 and len(encoded[0]) < 16
    pairs = tokenize(tokenizer, ["first"], ["second"], max_length=16)
    assert set(pairs[0].token_type_ids) == {0, 1}  # the pair's second text is segment 1
    padded = collate(encoded, pad_id=0)
    assert padded.input_ids.shape == (2, 16) and padded.has_padding
    assert padded.attention_mask.sum(1).tolist() == [len(encoded[0]), 16]
    assert torch.equal(padded.input_ids[0, :len(encoded[0])], torch.tensor(encoded[0].input_ids))
    assert not collate([EncodedInput([1, 2], [0, 0])] * 3, pad_id=0).has_padding
    assert tokenize(tokenizer, [], None, 16) == []


@pytest.mark.parametrize("lengths, overhead, expected", [
    ([4, 4, 4, 100], 64, [[4, 4, 4], [100]]),  # 3 x 96 padded tokens cost more than a forward
    ([4, 4, 4, 100], 300, [[4, 4, 4, 100]]),  # ... unless a forward costs more still
    ([10, 12, 30, 31, 33], 20, [[10, 12], [30, 31, 33]]),
    ([10, 12, 30, 31, 33], 0, [[10], [12], [30], [31], [33]]),  # no padding at all
    ([7, 7, 7], 0, [[7, 7, 7]]),  # equal lengths never pad
])
def test_plan_cuts_where_padding_costs_more_than_a_forward(lengths, overhead, expected):
    batches = plan_batches(lengths, max_tokens=10_000, max_seqs=64, overhead_tokens=overhead)
    assert [[lengths[i] for i in b] for b in batches] == expected


def test_padding_aware_plan_keeps_budget_rules_and_loses_nothing():
    rng = random.Random(1)
    for _ in range(100):
        lengths = [rng.randint(1, 128) for _ in range(rng.randint(1, 100))]
        batches = plan_batches(lengths, max_tokens=512, max_seqs=16, overhead_tokens=rng.choice([0, 8, 64, 10**6]))
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        for b in batches:
            assert len(b) <= 16 and (len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 512)
