"""The delta file: one task's trained bias/gamma values plus its classifier head, as safetensors.

Layout (see docs/delta-format.md for the full contract):

* site tensors, named exactly as in the Hugging Face *base* model (``encoder.layer.3.attention.
  self.query.bias``), holding the trained **values** (not differences), fp32, 1-D;
* ``head.weight`` [C, H] and ``head.bias`` [C];
* ``__metadata__``: string map with ``format``, ``task``, ``labels`` (JSON), ``problem_type``,
  ``pooling``, ``base_fingerprint``, ``architecture`` and the rest of :class:`Delta`'s fields.

:func:`parse` turns bytes from the wire or the disk into a :class:`DeltaFile` (the delta, its
bytes and their sha256, which is the served version) and checks everything that needs no base
model; it never unpickles and every error names the offending field. Checks that need the base
model (fingerprint, known sites, shapes) live in :func:`check_compatible`.

(About 400 lines, on purpose: the format's records, its parser and its writer change together
whenever the format does, and every malformed-file rule sits next to the field it guards.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import struct
import tempfile
import unicodedata
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from bitfit_serve.errors import BaseModelMismatch, InvalidDelta, InvalidInput

FORMAT = "bitfit-delta/1"
HEAD_WEIGHT = "head.weight"
HEAD_BIAS = "head.bias"
PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")
POOLINGS = ("pooler", "cls", "mean")
MAX_HEADER_BYTES = 1 << 20  # a MiniLM delta's header is ~10 KB; BERT-large's ~30 KB
MAX_LENGTH_LIMIT = 8192
MAX_METADATA_DEPTH = 16  # nesting of metrics / train_args (the trainer writes 3)
# Task names become file names and URL segments: a strict allowlist, no dots first, no separators.
# Matched whole (``is_task_name``): with ``match`` and ``$``, a trailing newline would pass.
TASK_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_LENGTH_RE = re.compile(r"[0-9]{1,5}")  # ASCII digits only: str.isdigit() also takes '²'


def is_task_name(name: str) -> bool:
    return isinstance(name, str) and TASK_NAME_RE.fullmatch(name) is not None


def check_task_name(task: str) -> str:
    """Raise InvalidInput unless ``task`` may be a task name (and so a file name and URL segment)."""
    if not is_task_name(task):
        raise InvalidInput(f"task name {task!r} is not allowed: use 1-64 characters from "
                           f"[A-Za-z0-9_.-], starting with a letter or digit")
    return task


_REQUIRED_METADATA = ("format", "task", "labels", "problem_type", "pooling", "base_fingerprint",
                      "architecture")


@dataclass(frozen=True)
class DeltaMeta:
    """What a task version is, apart from its tensors: the file's ``__metadata__``, parsed.

    One record, held by :class:`Delta` and by the registry's ``TaskVersion``; the HTTP and CLI
    views are built from it. Checked on construction, so a ``DeltaMeta`` in memory is sane."""

    task: str
    labels: tuple[str, ...]
    problem_type: str
    pooling: str
    base_fingerprint: str
    architecture: str
    base_model: str = ""
    inputs: tuple[str, ...] = ("text",)
    max_length: int = 128
    scheme: str = "bitfit"
    metrics: Mapping[str, Any] = field(default_factory=dict)
    train_args: Mapping[str, Any] = field(default_factory=dict)
    created_at: str = ""
    trainer_version: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "inputs", tuple(self.inputs))
        if not is_task_name(self.task):
            raise InvalidDelta(f"task: {self.task!r} is not a valid task name (pattern {TASK_NAME_RE.pattern})")
        if self.problem_type not in PROBLEM_TYPES:
            raise InvalidDelta(f"problem_type: {self.problem_type!r} is not one of {PROBLEM_TYPES}")
        if self.pooling not in POOLINGS:
            raise InvalidDelta(f"pooling: {self.pooling!r} is not one of {POOLINGS}")
        if not self.labels or not all(isinstance(x, str) and x for x in self.labels):
            raise InvalidDelta("labels: must be a non-empty list of non-empty strings")
        if len(set(self.labels)) != len(self.labels):
            raise InvalidDelta(f"labels: duplicate label names in {list(self.labels)}")
        if len({unicodedata.normalize("NFC", x) for x in self.labels}) != len(self.labels):
            raise InvalidDelta("labels: two labels are the same text in different Unicode forms (NFC/NFD)")
        if self.problem_type == "regression" and len(self.labels) != 1:
            raise InvalidDelta(f"labels: a regression task has exactly one output, got {len(self.labels)}")
        if self.problem_type == "single_label_classification" and len(self.labels) < 2:
            raise InvalidDelta("labels: single-label classification needs at least two labels")
        if len(self.inputs) not in (1, 2) or not all(isinstance(x, str) and x for x in self.inputs):
            raise InvalidDelta(f"inputs: must name one or two text fields, got {list(self.inputs)}")
        if not isinstance(self.max_length, int) or not 2 <= self.max_length <= MAX_LENGTH_LIMIT:
            raise InvalidDelta(f"max_length: {self.max_length!r} must be an integer in [2, {MAX_LENGTH_LIMIT}]")
        for f in fields(self):  # everything here is answered as JSON later: it must serialize now
            _check_emittable(f.name, getattr(self, f.name))

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def is_pair_task(self) -> bool:
        return len(self.inputs) == 2

    def to_metadata(self) -> dict[str, str]:
        """The safetensors ``__metadata__`` string map."""
        return {
            "format": FORMAT,
            "task": self.task,
            "base_model": self.base_model,
            "base_fingerprint": self.base_fingerprint,
            "architecture": self.architecture,
            "problem_type": self.problem_type,
            "labels": json.dumps(list(self.labels)),
            "pooling": self.pooling,
            "inputs": json.dumps(list(self.inputs)),
            "max_length": str(self.max_length),
            "scheme": self.scheme,
            "metrics": json.dumps(dict(self.metrics)),
            "train_args": json.dumps(dict(self.train_args)),
            "created_at": self.created_at,
            "trainer_version": self.trainer_version,
        }

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], source: str = "<bytes>") -> "DeltaMeta":
        missing = [k for k in _REQUIRED_METADATA if k not in meta]
        if missing:
            raise InvalidDelta(f"{source}: metadata field(s) missing: {', '.join(missing)}")
        if meta["format"] != FORMAT:
            raise InvalidDelta(f"format: unsupported format version {meta['format']!r} (this server reads {FORMAT!r})")
        max_length = meta.get("max_length", "128")
        if not MAX_LENGTH_RE.fullmatch(max_length):
            raise InvalidDelta(f"max_length: {max_length!r} is not an integer of at most 5 digits")
        return cls(
            task=meta["task"],
            labels=tuple(_json_field(meta, "labels", list)),
            problem_type=meta["problem_type"],
            pooling=meta["pooling"],
            base_fingerprint=meta["base_fingerprint"],
            architecture=meta["architecture"],
            base_model=meta.get("base_model", ""),
            inputs=tuple(_json_field(meta, "inputs", list, default=["text"])),
            max_length=int(max_length),
            scheme=meta.get("scheme", ""),
            metrics=_json_field(meta, "metrics", dict, default={}),
            train_args=_json_field(meta, "train_args", dict, default={}),
            created_at=meta.get("created_at", ""),
            trainer_version=meta.get("trainer_version", ""),
        )


META_FIELDS = frozenset(f.name for f in fields(DeltaMeta))


def _check_emittable(where: str, value: Any, depth: int = 0) -> None:
    """Raise InvalidDelta unless ``value`` can be sent back as the API's JSON: UTF-8 text (no lone
    surrogates), finite numbers, at most MAX_METADATA_DEPTH levels of nesting. A delta that parses
    but cannot be listed would break ``GET /v1/tasks`` for every tenant, across restarts."""
    if depth > MAX_METADATA_DEPTH:
        raise InvalidDelta(f"{where}: nested deeper than {MAX_METADATA_DEPTH} levels")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidDelta(f"{where}: not valid Unicode text (a lone surrogate)") from None
    elif isinstance(value, float) and not math.isfinite(value):
        raise InvalidDelta(f"{where}: {value} is not a finite number (JSON has no NaN or Infinity)")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _check_emittable(f"{where}: a key", key, depth + 1)
            _check_emittable(f"{where}.{key}" if len(where) < 200 else where, item, depth + 1)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_emittable(where, item, depth + 1)


@dataclass(frozen=True)
class Delta:
    """One task version in memory: its metadata plus its tensors. ``sites`` maps HF base names to
    trained values (fp32, 1-D). Metadata reads through: ``delta.labels`` is ``delta.meta.labels``."""

    meta: DeltaMeta
    sites: Mapping[str, torch.Tensor]
    head_weight: torch.Tensor  # [C, H]
    head_bias: torch.Tensor  # [C]

    def __post_init__(self) -> None:
        _check_tensors(self)

    @classmethod
    def of(cls, *, sites: Mapping[str, torch.Tensor], head_weight: torch.Tensor, head_bias: torch.Tensor,
           **meta: Any) -> "Delta":
        """Build from flat keywords: the tensors plus :class:`DeltaMeta`'s fields."""
        return cls(DeltaMeta(**meta), sites, head_weight, head_bias)

    def replace(self, **changes: Any) -> "Delta":
        """A copy with some tensors and/or metadata fields changed (checked again)."""
        meta = {k: v for k, v in changes.items() if k in META_FIELDS}
        rest = {k: v for k, v in changes.items() if k not in META_FIELDS}
        return dataclasses.replace(self, meta=dataclasses.replace(self.meta, **meta) if meta else self.meta, **rest)

    def __getattr__(self, name: str) -> Any:
        if name in META_FIELDS or name in ("num_labels", "is_pair_task"):
            return getattr(self.meta, name)
        raise AttributeError(f"'Delta' object has no attribute {name!r}")

    @property
    def nbytes(self) -> int:
        """Bytes of trained values (fp32), the figure that scales with the number of tasks."""
        tensors = [*self.sites.values(), self.head_weight, self.head_bias]
        return sum(t.numel() * t.element_size() for t in tensors)

    def metadata(self) -> dict[str, str]:
        return self.meta.to_metadata()


def _check_tensors(d: Delta) -> None:
    """Checks of the tensors that need no base model (the metadata checked itself)."""
    for name, t in [*d.sites.items(), (HEAD_WEIGHT, d.head_weight), (HEAD_BIAS, d.head_bias)]:
        if not isinstance(t, torch.Tensor):
            raise InvalidDelta(f"{name}: not a tensor")
        if t.dtype != torch.float32:
            raise InvalidDelta(f"{name}: dtype {t.dtype} is not float32")
        if not torch.isfinite(t).all():
            raise InvalidDelta(f"{name}: contains NaN or Inf")
    for name, t in d.sites.items():
        if t.dim() != 1 or t.numel() == 0:
            raise InvalidDelta(f"{name}: a site must be a non-empty vector, got shape {list(t.shape)}")
    if d.head_weight.dim() != 2 or d.head_bias.dim() != 1:
        raise InvalidDelta(f"head: expected head.weight [C, H] and head.bias [C], got "
                           f"{list(d.head_weight.shape)} and {list(d.head_bias.shape)}")
    if d.head_weight.shape[0] != len(d.meta.labels) or d.head_bias.shape[0] != len(d.meta.labels):
        raise InvalidDelta(f"head: {d.head_weight.shape[0]} output rows but {len(d.meta.labels)} labels")


@dataclass(frozen=True)
class DeltaFile:
    """A delta with the exact bytes it came from (the wire or the disk) and their sha256: the
    version a server serves is the file's hash, so both travel together from parse to publish."""

    delta: Delta
    data: bytes
    sha256: str

    @property
    def version(self) -> str:
        return self.sha256[:16]

    @classmethod
    def of(cls, delta: Delta) -> "DeltaFile":
        """Serialize a delta built in memory (the trainer, tests)."""
        data = to_bytes(delta)
        return cls(delta, data, sha256_bytes(data))

    def renamed(self, task: str) -> "DeltaFile":
        """The same delta under another task name (re-serialized: the bytes, so the version, change)."""
        return self if self.delta.task == task else DeltaFile.of(self.delta.replace(task=task))


# ----------------------------------------------------------------------------- serialization

def to_bytes(delta: Delta) -> bytes:
    """The delta as a safetensors file, byte for byte the same for the same delta: its version is
    the sha256 of these bytes, so an identical upload or re-save must not become a new version."""
    tensors = {name: t.detach().to(torch.float32).contiguous() for name, t in delta.sites.items()}
    tensors[HEAD_WEIGHT] = delta.head_weight.detach().contiguous()
    tensors[HEAD_BIAS] = delta.head_bias.detach().contiguous()
    return _sorted_header(st_save(tensors, metadata=delta.metadata()))


def _sorted_header(data: bytes) -> bytes:
    """safetensors writes its header's keys in hash-map order, which changes from call to call;
    rewrite the header with sorted keys (space-padded to 8 bytes, as the format asks). The tensor
    data after it, and the offsets into it, are unchanged."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.dumps(json.loads(data[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + data[8 + n:]


def save(delta: Delta, path: str | os.PathLike) -> Path:
    """Write atomically (temp file in the same folder, fsync, rename): a crash never leaves half a file."""
    path = Path(path)
    atomic_write(path, to_bytes(delta))
    return path


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp makes 0600; a delta is no secret, tools read it
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read(path: str | os.PathLike) -> DeltaFile:
    """Read and parse a delta file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InvalidDelta(f"cannot read delta file {path}: {e.strerror}") from e
    return parse(data, source=str(path))


def load(path: str | os.PathLike) -> Delta:
    return read(path).delta


def read_header(data: bytes, source: str = "<bytes>") -> tuple[dict[str, Any], dict[str, str]]:
    """Parse the safetensors header ourselves so that size, duplicates and metadata are checked
    before the tensor parser sees the bytes. Returns (tensor entries, metadata)."""
    if len(data) < 8:
        raise InvalidDelta(f"{source}: not a safetensors file (only {len(data)} bytes)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES:
        raise InvalidDelta(f"{source}: safetensors header of {header_len} bytes exceeds the "
                           f"{MAX_HEADER_BYTES}-byte limit")
    if 8 + header_len > len(data):
        raise InvalidDelta(f"{source}: not a safetensors file or truncated (header says "
                           f"{header_len} bytes, file has {len(data) - 8})")
    try:
        header = json.loads(data[8:8 + header_len].decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, integers past Python's digit limit, deep nesting
        raise InvalidDelta(f"{source}: not a safetensors file (header is not JSON: {e})") from e
    if not isinstance(header, dict):
        raise InvalidDelta(f"{source}: not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        raise InvalidDelta(f"{source}: __metadata__ missing; not a bitfit delta")
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidDelta(f"{source}: __metadata__ must be a map of strings")
    return header, metadata


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise InvalidDelta(f"safetensors header: duplicate key {dup!r}")
    return dict(pairs)


def parse(data: bytes, source: str = "<bytes>") -> DeltaFile:
    """Parse and validate a delta file's bytes, once: everything that needs no base model.
    Raises InvalidDelta naming the problem."""
    header, meta = read_header(data, source)
    parsed_meta = DeltaMeta.from_metadata(meta, source)
    for name, entry in header.items():
        if not isinstance(entry, dict) or entry.get("dtype") != "F32":
            dtype = entry.get("dtype") if isinstance(entry, dict) else entry
            raise InvalidDelta(f"{name}: dtype {dtype!r} is not F32 (deltas store fp32 values)")
    for required in (HEAD_WEIGHT, HEAD_BIAS):
        if required not in header:
            raise InvalidDelta(f"{required}: missing (every delta carries its classifier head)")
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own error types for every malformation
        raise InvalidDelta(f"{source}: not a valid safetensors file: {e}") from e
    delta = Delta(parsed_meta, {k: v for k, v in tensors.items() if k not in (HEAD_WEIGHT, HEAD_BIAS)},
                  tensors[HEAD_WEIGHT], tensors[HEAD_BIAS])
    return DeltaFile(delta, bytes(data), sha256_bytes(data))


def _json_field(meta: Mapping[str, str], key: str, kind: type, default: Any = None) -> Any:
    if key not in meta:
        return default
    try:
        value = json.loads(meta[key])
    except (ValueError, RecursionError) as e:  # not JSON, integers past Python's digit limit, deep nesting
        raise InvalidDelta(f"{key}: not valid JSON ({e})") from e
    if not isinstance(value, kind):
        raise InvalidDelta(f"{key}: expected a JSON {kind.__name__}, got {type(value).__name__}")
    return value


# ----------------------------------------------------------------------------- base checks

def check_compatible(delta: Delta, *, fingerprint: str, architecture: str,
                     site_shapes: Mapping[str, tuple[int, ...]], hidden_size: int) -> None:
    """Checks that need the served base: same weights, known sites, matching shapes."""
    if delta.architecture != architecture:
        raise BaseModelMismatch(f"architecture: delta is for {delta.architecture!r}, the served base is {architecture!r}")
    if delta.base_fingerprint != fingerprint:
        raise BaseModelMismatch(
            f"base_fingerprint: delta was trained on base {delta.base_fingerprint[:16]}... "
            f"({delta.base_model or 'unnamed'}), the served base is {fingerprint[:16]}...")
    for name, t in delta.sites.items():
        if name not in site_shapes:
            hint = (" (weight matrices are not servable: a BitFit delta changes only biases and"
                    " LayerNorm gammas)" if name.endswith(".weight") and "LayerNorm" not in name else "")
            raise InvalidDelta(f"{name}: not a known site of this {architecture} base{hint}")
        if tuple(t.shape) != tuple(site_shapes[name]):
            raise InvalidDelta(f"{name}: shape {list(t.shape)} does not match the base's {list(site_shapes[name])}")
    if delta.head_weight.shape[1] != hidden_size:
        raise InvalidDelta(f"head.weight: input size {delta.head_weight.shape[1]} does not match hidden size {hidden_size}")
    if delta.pooling == "pooler" and "pooler.dense.bias" not in site_shapes:
        raise InvalidDelta("pooling: 'pooler' requested but the base model has no pooler")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
