"""Inputs, from a request's texts to padded batches: the one place text becomes token ids.

The server's batcher, ``Engine.predict``, the trainer and the benchmarks all tokenize with
:func:`tokenize`, pad with :func:`collate` and cut batches with :func:`plan_batches`, so a delta
is served on exactly the token ids it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, Union

import torch

from bitfit_serve.errors import InvalidInput

TextInput = Union[str, Sequence[str]]  # one text, or a (first, second) pair for pair tasks

# A forward costs a fixed overhead plus a cost per padded token. The overhead, in padded tokens'
# worth, decides how to cut sequences of mixed lengths into batches: on a CPU it is small, so
# length groups that waste no padding win (benchmarks/vs_swap.py, GLUE cases); on a GPU a forward
# costs thousands of tokens' worth of launches, so the largest batches win.
FORWARD_OVERHEAD_TOKENS = {"cpu": 64, "cuda": 16384}


@dataclass(frozen=True)
class EncodedInput:
    """One tokenized sequence, truncated to its task's max_length."""

    input_ids: list[int]
    token_type_ids: list[int]
    full_length: int | None = None  # tokens before truncation (None: not counted)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def tokens(self) -> int:
        """The input's length in tokens, before any truncation."""
        return self.full_length if self.full_length is not None else len(self.input_ids)

    @property
    def truncated(self) -> bool:
        return self.tokens > len(self.input_ids)


@dataclass(frozen=True)
class Padded:
    """Right-padded [B, T] tensors of a batch (on the CPU; ``to`` moves them)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor
    has_padding: bool  # some row is shorter than T

    def to(self, device: torch.device | str) -> "Padded":
        return Padded(self.input_ids.to(device), self.attention_mask.to(device), self.token_type_ids.to(device),
                      self.has_padding)

    def as_hf(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of a Hugging Face model's forward."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "token_type_ids": self.token_type_ids}


def split_pairs(inputs: Sequence[TextInput], pair: bool, task: str = "", field_names: Sequence[str] = (),
                positions: Sequence[int] | None = None) -> tuple[list[str], list[str] | None]:
    """Check each input's shape against the task (one text, or a pair of texts) and return the
    first texts and, for pair tasks, the second ones. ``positions``: the inputs' indices in the
    caller's request, for error messages."""
    firsts, seconds = [], []
    for i, item in zip(positions or range(len(inputs)), inputs):
        if pair:
            if isinstance(item, str) or not isinstance(item, Sequence) or len(item) != 2 \
                    or not all(isinstance(s, str) for s in item):
                names = ", ".join(repr(n) for n in field_names)
                raise InvalidInput(f"inputs[{i}]: task {task!r} takes text pairs [{names}]")
            firsts.append(item[0])
            seconds.append(item[1])
        else:
            if not isinstance(item, str):
                raise InvalidInput(f"inputs[{i}]: task {task!r} takes one text per input, not a pair")
            firsts.append(item)
    return firsts, (seconds if pair else None)


def tokenize(tokenizer: Any, firsts: Sequence[str], seconds: Sequence[str] | None,
             max_length: int) -> list[EncodedInput]:
    """One tokenizer call: truncated to ``max_length``, with token type ids, no padding. Each
    sequence knows its length before truncation: only those that reached ``max_length`` (so may
    have been cut) are counted again, untruncated, so the common case costs one call. Pairs go
    through ``_tokenize_pairs`` (the tokenizer's own pair truncation costs quadratic time)."""
    if not firsts:
        return []
    firsts = list(firsts)
    if seconds is not None:
        return _tokenize_pairs(tokenizer, firsts, list(seconds), max_length)
    enc = tokenizer(firsts, truncation=True, max_length=max_length,
                    return_token_type_ids=True, return_attention_mask=False)
    full = {i: len(ids) for i, ids in enumerate(enc["input_ids"])}
    cut = [i for i, ids in enumerate(enc["input_ids"]) if len(ids) >= max_length]
    if cut:
        counted = tokenizer([firsts[i] for i in cut], truncation=False, return_token_type_ids=False,
                            return_attention_mask=False)
        full.update((i, len(ids)) for i, ids in zip(cut, counted["input_ids"]))
    return [EncodedInput(ids, types, full[i])
            for i, (ids, types) in enumerate(zip(enc["input_ids"], enc["token_type_ids"]))]


def longest_first(n1: int, n2: int, budget: int) -> tuple[int, int]:
    """Tokens kept of each text of a pair under ``budget`` (max_length minus special tokens), as
    HF tokenizers' ``longest_first`` keeps them: the shorter text keeps up to half the budget,
    the longer one the rest (on a tie the second counts as the longer)."""
    if n1 + n2 <= budget:
        return n1, n2
    short = min(n1, n2, budget // 2)
    long = min(max(n1, n2), budget - short)
    return (long, short) if n1 > n2 else (short, long)


@dataclass(frozen=True)
class PairTemplate:
    """Where a tokenizer puts its special tokens around a pair (BERT: ``[CLS] a [SEP] b [SEP]``,
    RoBERTa: ``<s> a </s></s> b </s>``) and the token type of each part."""

    ids: tuple[list[int], list[int], list[int]]  # before the first text, between, after the second
    types: tuple[list[int], list[int], list[int]]
    first_type: int
    second_type: int

    @classmethod
    def of(cls, tokenizer: Any) -> "PairTemplate":
        """Read off the tokenizer's own encoding of a pair of one-token texts."""
        (a,), (b,) = tokenizer(["a", "b"], add_special_tokens=False)["input_ids"]
        pair = tokenizer("a", "b", return_token_type_ids=True)
        ids, types = pair["input_ids"], pair["token_type_ids"]
        i = ids.index(a)
        j = ids.index(b, i + 1)
        return cls(ids=(ids[:i], ids[i + 1:j], ids[j + 1:]), types=(types[:i], types[i + 1:j], types[j + 1:]),
                   first_type=types[i], second_type=types[j])

    def join(self, first: list[int], second: list[int]) -> EncodedInput:
        before, between, after = self.ids
        t_before, t_between, t_after = self.types
        return EncodedInput(before + first + between + second + after,
                            t_before + [self.first_type] * len(first) + t_between
                            + [self.second_type] * len(second) + t_after)

    @property
    def specials(self) -> int:
        return sum(len(part) for part in self.ids)


def _tokenize_pairs(tokenizer: Any, firsts: list[str], seconds: list[str], max_length: int) -> list[EncodedInput]:
    """Each text tokenized alone (one call, linear time), cut by ``longest_first``, joined with the
    tokenizer's special tokens: the same ids and types as the tokenizer's pair call with
    truncation (tested for BERT, RoBERTa and MiniLM tokenizers), without its cost. HF tokenizers
    truncate a pair by building every combination of the two texts' overflowing windows: two
    10,000-character texts took ~7 s at max_length 128 and ~2 min at max_length 5, holding the
    one tokenizer thread for every client."""
    template = PairTemplate.of(tokenizer)
    budget = max(0, max_length - template.specials)
    alone = tokenizer(firsts + seconds, add_special_tokens=False, return_token_type_ids=False,
                      return_attention_mask=False)["input_ids"]
    out = []
    for a, b in zip(alone[:len(firsts)], alone[len(firsts):]):
        keep_a, keep_b = longest_first(len(a), len(b), budget)
        joined = template.join(a[:keep_a], b[:keep_b])
        out.append(EncodedInput(joined.input_ids, joined.token_type_ids, len(a) + len(b) + template.specials))
    return out


def collate(encoded: Sequence[EncodedInput], pad_id: int) -> Padded:
    """Right-pad to the longest sequence (dynamic padding)."""
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    types = torch.zeros((len(encoded), width), dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, e in enumerate(encoded):
        n = len(e)
        ids[i, :n] = torch.tensor(e.input_ids)
        types[i, :n] = torch.tensor(e.token_type_ids)
        mask[i, :n] = 1
    return Padded(ids, mask, types, has_padding=any(len(e) < width for e in encoded))


def plan_batches(lengths: Sequence[int], *, max_tokens: int, max_seqs: int, overhead_tokens: int) -> list[list[int]]:
    """Cut sequences into batches, shortest first (indices into ``lengths``).

    A batch takes the next, longer sequence while the padding that adds to the batch costs less
    than starting another forward would (``overhead_tokens``), within ``max_tokens`` padded
    tokens (a sequence longer than that runs alone) and ``max_seqs`` sequences."""
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        n = lengths[i]
        if current and (len(current) == max_seqs or n * (len(current) + 1) > max_tokens
                        or len(current) * (n - longest) > overhead_tokens):
            batches.append(current)
            current = []
        current.append(i)
        longest = n
    if current:
        batches.append(current)
    return batches
