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
    have been cut) are counted again, untruncated, so the common case costs one call."""
    if not firsts:
        return []
    firsts, seconds = list(firsts), list(seconds) if seconds is not None else None
    enc = tokenizer(firsts, seconds, truncation=True, max_length=max_length,
                    return_token_type_ids=True, return_attention_mask=False)
    full = {i: len(ids) for i, ids in enumerate(enc["input_ids"])}
    cut = [i for i, ids in enumerate(enc["input_ids"]) if len(ids) >= max_length]
    if cut:
        counted = tokenizer([firsts[i] for i in cut], [seconds[i] for i in cut] if seconds is not None else None,
                            truncation=False, return_token_type_ids=False, return_attention_mask=False)
        full.update((i, len(ids)) for i, ids in zip(cut, counted["input_ids"]))
    return [EncodedInput(ids, types, full[i])
            for i, (ids, types) in enumerate(zip(enc["input_ids"], enc["token_type_ids"]))]


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
