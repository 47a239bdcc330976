"""The Python API: one frozen encoder, many tasks, mixed-task batches in one forward.

    engine = Engine.from_pretrained()            # bundled MiniLM, or any local BERT/RoBERTa folder
    engine.add_task(delta.load("deltas/sst2.safetensors"))
    engine.predict([("sst2", "a gripping film"), ("rte", ("A man sleeps.", "A man is awake."))])

The server builds on the same pieces (``tokenize`` / ``collate`` / ``forward`` / ``postprocess``)
so that its batcher can tokenize off the event loop and run one forward per batch.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence, Union

import torch

from bitfit_serve import delta as delta_io
from bitfit_serve.delta import Delta
from bitfit_serve.errors import InvalidDelta, InvalidInput
from bitfit_serve.model.banks import Banks
from bitfit_serve.model.base import BaseModel, load_base
from bitfit_serve.model.encoder import EncoderBatch, forward
from bitfit_serve.registry import TaskRegistry, TaskVersion
from bitfit_serve.settings import MAX_BATCH_REQUESTS, MAX_BATCH_TOKENS

TextInput = Union[str, Sequence[str]]  # one text, or a (first, second) pair for pair tasks

# A forward costs a fixed overhead plus a cost per padded token. The overhead, in padded tokens'
# worth, decides how to cut sequences of mixed lengths into batches: on a CPU it is small, so
# length groups that waste no padding win (benchmarks/vs_swap.py, GLUE cases); on a GPU a forward
# costs thousands of tokens' worth of launches, so the largest batches win.
FORWARD_OVERHEAD_TOKENS = {"cpu": 64, "cuda": 16384}


@dataclass(frozen=True)
class Prediction:
    task: str
    version: str
    label: str | None = None  # classification: the top label
    score: float | None = None  # its probability
    scores: dict[str, float] | None = None  # every label's probability
    value: float | None = None  # regression output


@dataclass(frozen=True)
class EncodedInput:
    """One tokenized sequence, truncated to its task's max_length."""

    input_ids: list[int]
    token_type_ids: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


class Engine:
    def __init__(self, base: BaseModel, initial_capacity: int = 8, forward_overhead_tokens: int | None = None):
        self.base = base
        # see FORWARD_OVERHEAD_TOKENS; an unknown device type gets the GPU's value
        if forward_overhead_tokens is None:
            forward_overhead_tokens = FORWARD_OVERHEAD_TOKENS.get(torch.device(base.device).type,
                                                                  FORWARD_OVERHEAD_TOKENS["cuda"])
        self.forward_overhead_tokens = forward_overhead_tokens
        base_sites = {name: base.weights[name] for name in base.site_shapes}
        self.banks = Banks(base_sites, base.hidden_size, base.device, base.dtype, initial_capacity)
        self.registry = TaskRegistry(free_row=self.banks.free)
        self._admin_lock = threading.Lock()  # one add/replace/remove at a time

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, device: str = "cpu",
                        dtype: str | torch.dtype = "float32", initial_capacity: int = 8,
                        forward_overhead_tokens: int | None = None) -> "Engine":
        return cls(load_base(path, device=device, dtype=dtype), initial_capacity=initial_capacity,
                   forward_overhead_tokens=forward_overhead_tokens)

    # ------------------------------------------------------------------ tasks
    def add_task(self, source: Delta | bytes | str | os.PathLike, *, file_bytes: bytes | None = None) -> TaskVersion:
        """Validate, write into a fresh row, then publish atomically (replacing any older version).

        The served version is the sha256 of the delta's file. ``file_bytes``: the bytes a parsed
        ``Delta`` was read from, so that a caller who already parsed them (the upload path) does
        not pay for a second parse or a re-serialization."""
        if isinstance(source, Delta):
            delta, data = source, file_bytes if file_bytes is not None else delta_io.to_bytes(source)
        else:
            data = self._delta_bytes(source)
            delta = delta_io.from_bytes(data, source=_describe(source))
        self.check(delta)
        sha = delta_io.sha256_bytes(data)
        with self._admin_lock:
            row = self.banks.allocate()
            try:
                self.banks.write(row, delta)
            except BaseException:
                self.banks.free(row)
                raise
            version = TaskVersion(
                task=delta.task, version=sha[:16], sha256=sha, row=row, labels=delta.labels,
                problem_type=delta.problem_type, pooling=delta.pooling, inputs=delta.inputs,
                max_length=min(delta.max_length, self.max_positions), scheme=delta.scheme,
                sites=tuple(sorted(delta.sites)), nbytes=delta.nbytes, base_model=delta.base_model,
                metrics=dict(delta.metrics), train_args=dict(delta.train_args),
                created_at=delta.created_at, trainer_version=delta.trainer_version,
            )
            self.registry.publish(version)
        return version

    def check(self, delta: Delta) -> None:
        """Raise InvalidDelta / BaseModelMismatch unless ``delta`` can be served on this base."""
        delta_io.check_compatible(delta, fingerprint=self.base.fingerprint,
                                  architecture=self.base.architecture.name,
                                  site_shapes=self.base.site_shapes, hidden_size=self.base.hidden_size)

    def remove_task(self, task: str) -> TaskVersion:
        with self._admin_lock:
            return self.registry.unpublish(task)

    def tasks(self) -> list[TaskVersion]:
        return self.registry.list()

    @property
    def max_positions(self) -> int:
        # RoBERTa reserves padding_idx + 1 positions before the first token.
        cfg = self.base.config
        offset = cfg.pad_token_id + 1 if self.base.architecture.name == "roberta" else 0
        return cfg.max_position_embeddings - offset

    @staticmethod
    def _delta_bytes(source: bytes | str | os.PathLike) -> bytes:
        if isinstance(source, (bytes, bytearray, memoryview)):
            return bytes(source)
        try:
            return Path(source).read_bytes()
        except OSError as e:
            raise InvalidDelta(f"cannot read delta file {source}: {e.strerror}") from e

    # ------------------------------------------------------------------ building blocks
    def tokenize(self, version: TaskVersion, inputs: Sequence[TextInput],
                 positions: Sequence[int] | None = None) -> list[EncodedInput]:
        """Check each input's shape against the task (text vs pair) and tokenize in one call.

        ``positions`` are the inputs' indices in the caller's request, for error messages."""
        firsts, seconds = [], []
        for i, item in zip(positions or range(len(inputs)), inputs):
            if version.is_pair_task:
                if isinstance(item, str) or not isinstance(item, Sequence) or len(item) != 2 \
                        or not all(isinstance(s, str) for s in item):
                    raise InvalidInput(f"inputs[{i}]: task {version.task!r} takes text pairs "
                                       f"[{version.inputs[0]!r}, {version.inputs[1]!r}]")
                firsts.append(item[0])
                seconds.append(item[1])
            else:
                if not isinstance(item, str):
                    raise InvalidInput(f"inputs[{i}]: task {version.task!r} takes one text per input, not a pair")
                firsts.append(item)
        if not firsts:
            return []
        enc = self.base.tokenizer(firsts, seconds or None, truncation=True, max_length=version.max_length,
                                  return_token_type_ids=True, return_attention_mask=False)
        return [EncodedInput(ids, types) for ids, types in zip(enc["input_ids"], enc["token_type_ids"])]

    def collate(self, encoded: Sequence[EncodedInput], rows: Sequence[int]) -> EncoderBatch:
        """Right-pad to the longest sequence and attach each sequence's bank row."""
        width = max(len(e) for e in encoded)
        pad = self.base.config.pad_token_id
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        types = torch.zeros((len(encoded), width), dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, e in enumerate(encoded):
            n = len(e)
            ids[i, :n] = torch.tensor(e.input_ids)
            types[i, :n] = torch.tensor(e.token_type_ids)
            mask[i, :n] = 1
        device = self.base.device
        return EncoderBatch.of_rows(ids.to(device), mask.to(device), types.to(device), rows,
                                    has_padding=any(len(e) < width for e in encoded))

    def forward(self, batch: EncoderBatch) -> torch.Tensor:
        """[B, C_max] fp32 logits on the CPU (padded columns are -inf)."""
        return forward(self.base, self.banks.view(), batch).float().cpu()

    def plan(self, lengths: Sequence[int], max_batch_size: int = MAX_BATCH_REQUESTS,
             max_batch_tokens: int = MAX_BATCH_TOKENS) -> list[list[int]]:
        """Indices of ``lengths`` cut into batches for this device (see ``plan_batches``)."""
        return plan_batches(lengths, max_tokens=max_batch_tokens, max_seqs=max_batch_size,
                            overhead_tokens=self.forward_overhead_tokens)

    def forward_many(self, encoded: Sequence[EncodedInput], rows: Sequence[int],
                     max_batch_size: int = MAX_BATCH_REQUESTS) -> torch.Tensor:
        """Logits for any number of sequences (tasks mixed), in input order: cut into batches by
        ``plan`` (one forward each), so that short sequences are not padded to long ones."""
        batches = self.plan([len(e) for e in encoded], max_batch_size)
        parts = [self.forward(self.collate([encoded[i] for i in b], [rows[i] for i in b])) for b in batches]
        # A task added between two forwards may widen the heads (C_max): pad the narrower parts.
        width = max((part.shape[1] for part in parts), default=0)
        logits = torch.full((len(encoded), width), float("-inf"))
        for b, part in zip(batches, parts):
            logits[b, :part.shape[1]] = part
        return logits

    @staticmethod
    def postprocess(version: TaskVersion, logits: torch.Tensor) -> Prediction:
        """One row of logits -> the task's answer (softmax / sigmoid / raw value)."""
        logits = logits[: len(version.labels)]
        if version.problem_type == "regression":
            return Prediction(version.task, version.version, value=float(logits[0]))
        if version.problem_type == "multi_label_classification":
            probs = torch.sigmoid(logits)
        else:
            probs = torch.softmax(logits, dim=-1)
        best = int(torch.argmax(probs))
        return Prediction(version.task, version.version, label=version.labels[best], score=float(probs[best]),
                          scores={label: float(p) for label, p in zip(version.labels, probs)})

    # ------------------------------------------------------------------ convenience API
    def predict(self, items: Iterable[tuple[str, TextInput]],
                max_batch_size: int = MAX_BATCH_REQUESTS) -> list[Prediction]:
        """Run ``(task, text_or_pair)`` items, tasks mixed freely, in length-sorted batches."""
        items = list(items)
        versions = self.registry.acquire(task for task, _ in items)
        try:
            encoded = self._tokenize_mixed(versions, [text for _, text in items])
            logits = self.forward_many(encoded, [v.row for v in versions], max_batch_size)
            return [self.postprocess(v, row_logits) for v, row_logits in zip(versions, logits)]
        finally:
            self.registry.release(versions)

    def _tokenize_mixed(self, versions: Sequence[TaskVersion], inputs: Sequence[TextInput]) -> list[EncodedInput]:
        """Tokenize items of many tasks with one tokenizer call per task, keeping item order."""
        by_row: dict[int, list[int]] = {}
        for i, v in enumerate(versions):
            by_row.setdefault(v.row, []).append(i)
        encoded: list[EncodedInput | None] = [None] * len(inputs)
        for idx in by_row.values():
            group = self.tokenize(versions[idx[0]], [inputs[i] for i in idx], positions=idx)
            for i, enc in zip(idx, group):
                encoded[i] = enc
        return encoded  # type: ignore[return-value]

    # ------------------------------------------------------------------ stats
    @property
    def bank_bytes(self) -> int:
        return self.banks.nbytes

    @property
    def bytes_per_task(self) -> int:
        """Bank bytes one row costs at the serving dtype (every banked site + the padded head)."""
        return self.banks.bytes_per_row


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


def _describe(source: object) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else "<upload>"
