"""A corpus of malformed delta files, built from one good delta. Each case is (id, bytes).

Every case must be rejected with a specific 4xx (InvalidDelta and subclasses). The corpus covers
truncation, random bytes, pickle payloads, header bloat and lies, bad offsets, shape overflow,
duplicate keys, non-finite values, wrong dtypes, unknown sites, weight matrices, wrong base,
label/head disagreement and broken metadata.
"""

from __future__ import annotations

import json
import pickle
import random
import struct
from typing import Iterator

import torch
from safetensors.torch import save as st_save

from bitfit_serve.delta import Delta, to_bytes

_DTYPES_BAD = ["F16", "BF16", "F64", "I64", "I32", "U8", "BOOL", "I8", "F8_E4M3"]


def _split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header: dict | str, body: bytes) -> bytes:
    text = header if isinstance(header, str) else json.dumps(header)
    data = text.encode()
    return struct.pack("<Q", len(data)) + data + body


def _with_tensors(good: Delta, tensors: dict[str, torch.Tensor], **meta) -> bytes:
    metadata = {**good.metadata(), **meta}
    return st_save({k: v.contiguous() for k, v in tensors.items()},
                   metadata={k: v for k, v in metadata.items() if v is not None})


def malformed_deltas(good: Delta, seed: int = 0) -> Iterator[tuple[str, bytes]]:
    rng = random.Random(seed)
    raw = to_bytes(good)
    header, body = _split(raw)
    tensors = {**good.sites, "head.weight": good.head_weight, "head.bias": good.head_bias}
    site = next(iter(good.sites))
    hidden = good.head_weight.shape[1]

    # Truncation at many points, header and body.
    for cut in sorted({0, 1, 7, 8, 9, 16, 100, len(raw) // 2, len(raw) - 1, len(raw) - 4}
                      | {rng.randrange(1, len(raw)) for _ in range(30)}):
        yield f"truncated-{cut}", raw[:cut]
    # Random bytes, with and without a plausible length prefix.
    for i in range(20):
        yield f"random-{i}", rng.randbytes(rng.choice([3, 64, 1000, 70_000]))
        yield f"random-prefixed-{i}", struct.pack("<Q", rng.randrange(2, 500)) + rng.randbytes(600)
    # Pickle payloads (never unpickled: the parser must refuse them as non-safetensors).
    for i, obj in enumerate([{"head.weight": [1.0]}, tensors, [1, 2, 3], "x" * 100, good.metadata()]):
        for proto in (2, 4, 5):
            yield f"pickle-{i}-p{proto}", pickle.dumps(obj if i != 1 else {k: v.tolist() for k, v in obj.items()},
                                                       protocol=proto)
    # Header length lies and bloat.
    for n in (1 << 20 + 1, 1 << 30, (1 << 63) - 1, (1 << 64) - 1, len(raw) + 10):
        yield f"header-len-{n}", struct.pack("<Q", n) + raw[8:]
    bloated = dict(header)
    bloated["__metadata__"] = {**header["__metadata__"], "pad": "x" * (2 << 20)}
    yield "header-bloat-2MiB", _join(bloated, body)
    yield "header-not-json", _join("{not json" + " " * 10, body)
    yield "header-array", _join("[]", body)
    yield "header-string", _join('"hello"', body)
    yield "header-utf8-broken", struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc" + body
    # JSON that json.loads refuses with ValueError / RecursionError rather than JSONDecodeError
    yield "header-huge-integer", _join('{"x": ' + "1" * 5000 + "}", body)
    yield "header-deep-nesting", _join('{"x": ' + "[" * 100_000 + "]" * 100_000 + "}", body)
    # Offsets: overlapping, zero-size, out of range, reversed, non-integers.
    names = [k for k in header if k != "__metadata__"]
    for i, name in enumerate(names[:12]):
        entry = header[name]
        b, e = entry["data_offsets"]
        for kind, offsets in [("zero", [b, b]), ("reversed", [e, b]), ("past-end", [b, len(body) + 4096]),
                              ("negative", [-4, e]), ("overlap", [b + 4, e + 4] if b == 0 else [0, e - b]), ("float", [float(b), float(e)])]:
            bad = json.loads(json.dumps(header))
            bad[name]["data_offsets"] = offsets
            yield f"offsets-{kind}-{i}", _join(bad, body)
    # Shapes: overflow, negative, disagreeing with the data.
    for i, shape in enumerate([[1 << 62, 1 << 62], [-1], [hidden, hidden], [0], [1 << 40], [3, -3], "32"]):
        bad = json.loads(json.dumps(header))
        bad[site]["shape"] = shape
        yield f"shape-{i}", _join(bad, body)
    # Duplicate keys in the header JSON.
    text = json.dumps(header)
    entry = json.dumps({"head.bias": header["head.bias"]})[1:-1]
    yield "duplicate-tensor-key", _join(text[:-1] + ", " + entry + "}", body)
    meta_entry = json.dumps({"__metadata__": header["__metadata__"]})[1:-1]
    yield "duplicate-metadata-key", _join(text[:-1] + ", " + meta_entry + "}", body)
    # Non-finite values at sites and in the head.
    for name in [site, "head.weight", "head.bias"]:
        for value in (float("nan"), float("inf"), float("-inf")):
            t = {k: v.clone() for k, v in tensors.items()}
            t[name].view(-1)[rng.randrange(t[name].numel())] = value
            yield f"nonfinite-{name}-{value}", _with_tensors(good, t)
    # Wrong dtypes, declared in the header.
    for dtype in _DTYPES_BAD:
        for name in [site, "head.weight"]:
            bad = json.loads(json.dumps(header))
            bad[name]["dtype"] = dtype
            yield f"dtype-{dtype}-{name}", _join(bad, body)
    # Real tensors of a wrong dtype.
    for dtype in (torch.float16, torch.bfloat16, torch.float64, torch.int64):
        yield f"real-dtype-{dtype}", _with_tensors(good, {**tensors, site: tensors[site].to(dtype)})
    # Unknown sites and weight matrices.
    for name in ["encoder.layer.99.output.dense.bias", "bert.encoder.layer.0.output.dense.bias",
                 "encoder.layer.0.output.dense.bias.extra", "embeddings.word_embeddings.weight",
                 "encoder.layer.0.attention.self.query.weight", "encoder.layer.0.intermediate.dense.weight",
                 "classifier.bias", "pooler.dense.weight", "../../etc/passwd", "head.extra", ""]:
        yield f"unknown-site-{name or 'empty'}", _with_tensors(good, {**tensors, name: torch.zeros(hidden)})
    yield "weight-matrix-2d", _with_tensors(
        good, {**tensors, "encoder.layer.0.attention.self.query.weight": torch.zeros(hidden, hidden)})
    # Wrong shapes of known sites and of the head.
    for i, shape in enumerate([(hidden + 1,), (1,), (hidden, 1), (2 * hidden,)]):
        yield f"site-shape-{i}", _with_tensors(good, {**tensors, site: torch.zeros(shape)})
    yield "head-hidden-mismatch", _with_tensors(good, {**tensors, "head.weight": torch.zeros(good.num_labels, hidden + 3)})
    yield "head-1d", _with_tensors(good, {**tensors, "head.weight": torch.zeros(hidden)})
    yield "head-bias-2d", _with_tensors(good, {**tensors, "head.bias": torch.zeros(good.num_labels, 1)})
    yield "head-rows-mismatch", _with_tensors(good, {**tensors, "head.bias": torch.zeros(good.num_labels + 1)})
    for required in ("head.weight", "head.bias"):
        yield f"missing-{required}", _with_tensors(good, {k: v for k, v in tensors.items() if k != required})
    # Wrong base model.
    for i, fp in enumerate(["0" * 64, good.base_fingerprint[:-1] + "x", "", "not-a-hash"]):
        yield f"fingerprint-{i}", _with_tensors(good, tensors, base_fingerprint=fp)
    for arch in ("roberta", "gpt2", "BERT", ""):
        yield f"architecture-{arch or 'empty'}", _with_tensors(good, tensors, architecture=arch)
    # Labels vs head, and broken metadata values.
    n = good.num_labels
    for i, labels in enumerate([[], ["a"] * n, [f"l{j}" for j in range(n + 1)], [f"l{j}" for j in range(n - 1)],
                                [1] * n, None, {"a": 1}, [""] * n]):
        value = json.dumps(labels) if labels is not None else "not json"
        yield f"labels-{i}", _with_tensors(good, tensors, labels=value)
    for key in ("format", "task", "labels", "problem_type", "pooling", "base_fingerprint", "architecture"):
        yield f"missing-meta-{key}", _with_tensors(good, tensors, **{key: None})
    for i, fmt in enumerate(["bitfit-delta/0", "bitfit-delta/2", "", "BITFIT-DELTA/1", "lora/1"]):
        yield f"format-{i}", _with_tensors(good, tensors, format=fmt)
    for key, value in [("problem_type", "ranking"), ("pooling", "max"), ("max_length", "-1"),
                       ("max_length", "1e9"), ("max_length", "99999"), ("inputs", "[]"),
                       ("inputs", '["a","b","c"]'), ("inputs", "{}"), ("metrics", "[1]"),
                       ("train_args", "nope"), ("task", ""), ("task", "../evil"), ("task", "a/b"),
                       ("task", "x" * 65), ("task", ".hidden"), ("task", "a\x00b"), ("task", "tâche"),
                       ("task", "nl\n"), ("max_length", "\u00b2"), ("max_length", "\u0661\u0662\u0668"),
                       ("max_length", "1" * 5000), ("metrics", '{"a": ' + "1" * 5000 + "}"),
                       ("labels", "[" * 50_000 + "]" * 50_000)]:
        yield f"meta-{key}-{value[:12]!r}", _with_tensors(good, tensors, **{key: value})
    no_meta = dict(header)
    no_meta.pop("__metadata__")
    yield "no-metadata", _join(no_meta, body)
    nonstr = json.loads(json.dumps(header))
    nonstr["__metadata__"]["max_length"] = 128
    yield "metadata-non-string", _join(nonstr, body)
    yield "empty-file", b""
