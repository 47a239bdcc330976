"""The Python API: one frozen encoder, many tasks, mixed-task batches in one forward.

    engine = Engine.from_pretrained()            # bundled MiniLM, or any local BERT/RoBERTa folder
    engine.add_task(delta.load("deltas/sst2.safetensors"))
    engine.predict([("sst2", "a gripping film"), ("rte", ("A man sleeps.", "A man is awake."))])

The server builds on the same pieces (``tokenize`` / ``collate`` / ``forward`` / ``postprocess``)
so that its batcher can tokenize off the event loop and run one forward per batch. Adding,
replacing and removing tasks is the ``tasks`` room's (``engine.tasks``); ``add_task`` and
``remove_task`` are the Python API's shortcuts to it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from bitfit_serve import delta as delta_io
from bitfit_serve.delta import Delta, DeltaFile
from bitfit_serve.errors import InputTooLong, NonFiniteOutput
from bitfit_serve.inputs import FORWARD_OVERHEAD_TOKENS, EncodedInput, TextInput, collate, plan_batches, \
    split_pairs, tokenize
from bitfit_serve.model.banks import Banks
from bitfit_serve.model.base import BaseModel, load_base
from bitfit_serve.model.encoder import EncoderBatch, forward
from bitfit_serve.registry import TaskVersion
from bitfit_serve.settings import MAX_BATCH_REQUESTS, MAX_BATCH_TOKENS
from bitfit_serve.tasks import Tasks


@dataclass(frozen=True)
class Prediction:
    task: str
    version: str
    label: str | None = None  # classification: the top label
    score: float | None = None  # its probability
    scores: dict[str, float] | None = None  # every label's probability
    value: float | None = None  # regression output
    logits: tuple[float, ...] = ()  # the head's raw outputs, one per label
    tokens: int | None = None  # the input's tokens before truncation
    truncated: bool | None = None  # the input was cut to the task's max_length


class Engine:
    """The base model, its banks, and the forward over them; ``tasks`` is the lifecycle room."""

    def __init__(self, base: BaseModel, initial_capacity: int = 8, forward_overhead_tokens: int | None = None):
        self.base = base
        # see FORWARD_OVERHEAD_TOKENS; an unknown device type gets the GPU's value
        if forward_overhead_tokens is None:
            forward_overhead_tokens = FORWARD_OVERHEAD_TOKENS.get(torch.device(base.device).type,
                                                                  FORWARD_OVERHEAD_TOKENS["cuda"])
        self.forward_overhead_tokens = forward_overhead_tokens
        base_sites = {name: base.weights[name] for name in base.site_shapes}
        self._banks = Banks(base_sites, base.hidden_size, base.device, base.dtype, initial_capacity)
        self.tasks = Tasks(base, self._banks, probe=self._probe)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, device: str = "cpu",
                        dtype: str | torch.dtype = "float32", initial_capacity: int = 8,
                        forward_overhead_tokens: int | None = None, revision: str | None = None) -> "Engine":
        """``path``: None or 'default' (the bundled MiniLM), a local HF folder, or a hub id (with
        ``revision``) found in the Hugging Face cache."""
        return cls(load_base(path, device=device, dtype=dtype, revision=revision), initial_capacity=initial_capacity,
                   forward_overhead_tokens=forward_overhead_tokens)

    # ------------------------------------------------------------------ Python API conveniences
    def add_task(self, source: Delta | DeltaFile | bytes | str | os.PathLike) -> TaskVersion:
        """Serve a delta (in memory, as bytes, or a file) under its own task name; replaces any
        version of it. The version is the sha256 of the delta's file. See ``Tasks.install``."""
        if isinstance(source, Delta):
            file = DeltaFile.of(source)
        elif isinstance(source, DeltaFile):
            file = source
        elif isinstance(source, (bytes, bytearray, memoryview)):
            file = delta_io.parse(bytes(source), source="<bytes>")
        else:
            file = delta_io.read(source)
        return self.tasks.install(file.delta.task, file).version

    def remove_task(self, task: str) -> TaskVersion:
        return self.tasks.remove(task)

    def _probe(self, version: TaskVersion) -> bool:
        """Whether a task's freshly written bank row gives finite outputs on a probe input (checked
        before it is published: a head of 3e38 or a LayerNorm bias of 1e30 parses but answers NaN)."""
        probe = [("probe", "probe")] if version.is_pair_task else ["probe"]
        batch = self.collate(self.tokenize(version, probe), [version.row])
        logits = forward(self.base, self._banks.view(), batch)[0, :len(version.labels)]  # not the batcher's path
        return bool(torch.isfinite(logits).all())

    # ------------------------------------------------------------------ building blocks
    def tokenize(self, version: TaskVersion, inputs: Sequence[TextInput],
                 positions: Sequence[int] | None = None, truncate: bool = True) -> list[EncodedInput]:
        """Check each input's shape against the task (text vs pair) and tokenize in one call.
        ``truncate`` False: an input longer than the task's max_length is an error, not cut.

        ``positions`` are the inputs' indices in the caller's request, for error messages."""
        positions = positions or range(len(inputs))
        firsts, seconds = split_pairs(inputs, version.is_pair_task, version.task, version.meta.inputs, positions)
        encoded = tokenize(self.base.tokenizer, firsts, seconds, version.max_length)
        for i, e in zip(positions, encoded):  # a guard: a longer sequence would fail its whole batch
            if len(e) > version.max_length:
                raise InputTooLong(f"inputs[{i}]: the tokenizer could not cut this input to task "
                                   f"{version.task!r}'s max_length {version.max_length} ({len(e)} tokens)")
        if not truncate:
            for i, e in zip(positions, encoded):
                if e.truncated:
                    raise InputTooLong(f"inputs[{i}]: {e.tokens} tokens exceed task {version.task!r}'s max_length "
                                       f"{version.max_length}; send a shorter input, or truncate=true")
        return encoded

    def collate(self, encoded: Sequence[EncodedInput], rows: Sequence[int]) -> EncoderBatch:
        """Right-pad to the longest sequence and attach each sequence's bank row."""
        padded = collate(encoded, self.base.config.pad_token_id).to(self.base.device)
        return EncoderBatch.of_rows(padded.input_ids, padded.attention_mask, padded.token_type_ids, rows,
                                    has_padding=padded.has_padding)

    def forward(self, batch: EncoderBatch) -> torch.Tensor:
        """[B, W] fp32 logits on the CPU, W the batch's widest head class (padded columns are -inf)."""
        return forward(self.base, self._banks.view(), batch).float().cpu()

    def plan(self, lengths: Sequence[int], max_batch_size: int = MAX_BATCH_REQUESTS,
             max_batch_tokens: int = MAX_BATCH_TOKENS) -> list[list[int]]:
        """Indices of ``lengths`` cut into batches for this device (see ``inputs.plan_batches``)."""
        return plan_batches(lengths, max_tokens=max_batch_tokens, max_seqs=max_batch_size,
                            overhead_tokens=self.forward_overhead_tokens)

    def forward_many(self, encoded: Sequence[EncodedInput], rows: Sequence[int],
                     max_batch_size: int = MAX_BATCH_REQUESTS) -> torch.Tensor:
        """Logits for any number of sequences (tasks mixed), in input order: cut into batches by
        ``plan`` (one forward each), so that short sequences are not padded to long ones."""
        batches = self.plan([len(e) for e in encoded], max_batch_size)
        parts = [self.forward(self.collate([encoded[i] for i in b], [rows[i] for i in b])) for b in batches]
        # Batches of different head width classes give different widths: pad the narrower parts.
        width = max((part.shape[1] for part in parts), default=0)
        logits = torch.full((len(encoded), width), float("-inf"))
        for b, part in zip(batches, parts):
            logits[b, :part.shape[1]] = part
        return logits

    @staticmethod
    def postprocess(version: TaskVersion, logits: torch.Tensor, encoded: EncodedInput | None = None) -> Prediction:
        """One row of logits -> the task's answer (softmax / sigmoid / raw value); ``encoded``,
        the sequence it came from, adds its token count and whether it was truncated."""
        logits = logits[: len(version.labels)]
        if not torch.isfinite(logits).all():
            raise NonFiniteOutput(f"task {version.task!r} (version {version.version}) produced non-finite outputs "
                                  f"(NaN or Inf) for an input; its delta is broken")
        size = {} if encoded is None else {"tokens": encoded.tokens, "truncated": encoded.truncated}
        raw = tuple(float(x) for x in logits)
        if version.problem_type == "regression":
            return Prediction(version.task, version.version, value=raw[0], logits=raw, **size)
        if version.problem_type == "multi_label_classification":
            probs = torch.sigmoid(logits)
        else:
            probs = torch.softmax(logits, dim=-1)
        best = int(torch.argmax(probs))
        return Prediction(version.task, version.version, label=version.labels[best], score=float(probs[best]),
                          scores={label: float(p) for label, p in zip(version.labels, probs)}, logits=raw, **size)

    def predict(self, items: Iterable[tuple[str, TextInput]],
                max_batch_size: int = MAX_BATCH_REQUESTS) -> list[Prediction]:
        """Run ``(task, text_or_pair)`` items, tasks mixed freely, in length-sorted batches."""
        items = list(items)
        versions = self.tasks.acquire(task for task, _ in items)
        try:
            encoded = self._tokenize_mixed(versions, [text for _, text in items])
            logits = self.forward_many(encoded, [v.row for v in versions], max_batch_size)
            return [self.postprocess(v, row_logits, e) for v, row_logits, e in zip(versions, logits, encoded)]
        finally:
            self.tasks.release(versions)

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
