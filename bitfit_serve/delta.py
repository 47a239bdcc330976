"""The delta file: one task's trained bias/gamma values plus its classifier head, as safetensors.

Layout (see docs/delta-format.md for the full contract):

* site tensors, named exactly as in the Hugging Face *base* model (``encoder.layer.3.attention.
  self.query.bias``), holding the trained **values** (not differences), fp32, 1-D;
* ``head.weight`` [C, H] and ``head.bias`` [C];
* ``__metadata__``: string map with ``format``, ``task``, ``labels`` (JSON), ``problem_type``,
  ``pooling``, ``base_fingerprint``, ``architecture`` and the rest of :class:`Delta`'s fields.

Parsing never unpickles and checks everything before anything is used; every error names the
offending field. Checks that need the base model (fingerprint, known sites, shapes) live in
:func:`check_compatible`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from bitfit_serve.errors import BaseModelMismatch, InvalidDelta

FORMAT = "bitfit-delta/1"
HEAD_WEIGHT = "head.weight"
HEAD_BIAS = "head.bias"
PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")
POOLINGS = ("pooler", "cls", "mean")
MAX_HEADER_BYTES = 1 << 20  # a MiniLM delta's header is ~10 KB; BERT-large's ~30 KB
MAX_LENGTH_LIMIT = 8192
# Task names become file names and URL segments: a strict allowlist, no dots first, no separators.
# Matched whole (``is_task_name``): with ``match`` and ``$``, a trailing newline would pass.
TASK_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_LENGTH_RE = re.compile(r"[0-9]{1,5}")  # ASCII digits only: str.isdigit() also takes '²'


def is_task_name(name: str) -> bool:
    return TASK_NAME_RE.fullmatch(name) is not None


_REQUIRED_METADATA = ("format", "task", "labels", "problem_type", "pooling", "base_fingerprint",
                      "architecture")


@dataclass(frozen=True)
class Delta:
    """One task version in memory. ``sites`` maps HF base names to trained values (fp32, 1-D)."""

    task: str
    sites: Mapping[str, torch.Tensor]
    head_weight: torch.Tensor  # [C, H]
    head_bias: torch.Tensor  # [C]
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
        _check_fields(self)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def is_pair_task(self) -> bool:
        return len(self.inputs) == 2

    @property
    def nbytes(self) -> int:
        """Bytes of trained values (fp32), the figure that scales with the number of tasks."""
        tensors = [*self.sites.values(), self.head_weight, self.head_bias]
        return sum(t.numel() * t.element_size() for t in tensors)

    def metadata(self) -> dict[str, str]:
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


def _check_fields(d: Delta) -> None:
    """Checks that need no base model. Runs on construction, so a Delta in memory is always sane."""
    if not isinstance(d.task, str) or not is_task_name(d.task):
        raise InvalidDelta(f"task: {d.task!r} is not a valid task name (pattern {TASK_NAME_RE.pattern})")
    if d.problem_type not in PROBLEM_TYPES:
        raise InvalidDelta(f"problem_type: {d.problem_type!r} is not one of {PROBLEM_TYPES}")
    if d.pooling not in POOLINGS:
        raise InvalidDelta(f"pooling: {d.pooling!r} is not one of {POOLINGS}")
    if not d.labels or not all(isinstance(x, str) and x for x in d.labels):
        raise InvalidDelta("labels: must be a non-empty list of non-empty strings")
    if len(set(d.labels)) != len(d.labels):
        raise InvalidDelta(f"labels: duplicate label names in {list(d.labels)}")
    if d.problem_type == "regression" and len(d.labels) != 1:
        raise InvalidDelta(f"labels: a regression task has exactly one output, got {len(d.labels)}")
    if d.problem_type == "single_label_classification" and len(d.labels) < 2:
        raise InvalidDelta("labels: single-label classification needs at least two labels")
    if len(d.inputs) not in (1, 2) or not all(isinstance(x, str) and x for x in d.inputs):
        raise InvalidDelta(f"inputs: must name one or two text fields, got {list(d.inputs)}")
    if not isinstance(d.max_length, int) or not 2 <= d.max_length <= MAX_LENGTH_LIMIT:
        raise InvalidDelta(f"max_length: {d.max_length!r} must be an integer in [2, {MAX_LENGTH_LIMIT}]")
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
    if d.head_weight.shape[0] != len(d.labels) or d.head_bias.shape[0] != len(d.labels):
        raise InvalidDelta(f"head: {d.head_weight.shape[0]} output rows but {len(d.labels)} labels")


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


def load(path: str | os.PathLike) -> Delta:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InvalidDelta(f"cannot read delta file {path}: {e.strerror}") from e
    return from_bytes(data, source=str(path))


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


def from_bytes(data: bytes, source: str = "<bytes>") -> Delta:
    """Parse and validate a delta file. Raises InvalidDelta naming the problem."""
    header, meta = read_header(data, source)
    missing = [k for k in _REQUIRED_METADATA if k not in meta]
    if missing:
        raise InvalidDelta(f"{source}: metadata field(s) missing: {', '.join(missing)}")
    if meta["format"] != FORMAT:
        raise InvalidDelta(f"format: unsupported format version {meta['format']!r} (this server reads {FORMAT!r})")
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

    labels = _json_field(meta, "labels", list)
    inputs = _json_field(meta, "inputs", list, default=["text"])
    max_length = meta.get("max_length", "128")
    if not MAX_LENGTH_RE.fullmatch(max_length):
        raise InvalidDelta(f"max_length: {max_length!r} is not an integer of at most 5 digits")
    return Delta(
        task=meta["task"],
        sites={k: v for k, v in tensors.items() if k not in (HEAD_WEIGHT, HEAD_BIAS)},
        head_weight=tensors[HEAD_WEIGHT],
        head_bias=tensors[HEAD_BIAS],
        labels=tuple(labels),
        problem_type=meta["problem_type"],
        pooling=meta["pooling"],
        base_fingerprint=meta["base_fingerprint"],
        architecture=meta["architecture"],
        base_model=meta.get("base_model", ""),
        inputs=tuple(inputs),
        max_length=int(max_length),
        scheme=meta.get("scheme", ""),
        metrics=_json_field(meta, "metrics", dict, default={}),
        train_args=_json_field(meta, "train_args", dict, default={}),
        created_at=meta.get("created_at", ""),
        trainer_version=meta.get("trainer_version", ""),
    )


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


def base_fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the frozen base tensors in sorted-name order: name, dtype, shape, bytes.

    Computed on the checkpoint's own dtype (before any cast to the serving dtype), so a delta
    trained in fp32 matches a server that runs fp16.
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
