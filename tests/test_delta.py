"""The delta file: round trip, and every validation error names its problem."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from bitfit_serve import Engine
from bitfit_serve import delta as delta_io
from bitfit_serve.errors import BaseModelMismatch, InvalidDelta
from tests.factories import random_delta


@pytest.fixture(scope="module")
def engine(tiny_bert_dir):
    return Engine.from_pretrained(tiny_bert_dir)


@pytest.fixture(scope="module")
def good(tiny_bert_dir):
    return random_delta(tiny_bert_dir, "good", sites="biases", num_labels=3, pooling="pooler")


def _raw(delta, tensors=None, **meta_overrides) -> bytes:
    """Serialize with arbitrary tensors/metadata, bypassing Delta's own checks."""
    tensors = tensors if tensors is not None else {
        **delta.sites, "head.weight": delta.head_weight, "head.bias": delta.head_bias}
    meta = {**delta.metadata(), **meta_overrides}
    meta = {k: v for k, v in meta.items() if v is not None}
    return st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)


def test_round_trip_preserves_everything(good, tmp_path):
    path = delta_io.save(good, tmp_path / "good.safetensors")
    back = delta_io.load(path)
    assert back.metadata() == good.metadata()
    assert back.sites.keys() == good.sites.keys()
    for name in good.sites:
        assert torch.equal(back.sites[name], good.sites[name])
    assert torch.equal(back.head_weight, good.head_weight) and torch.equal(back.head_bias, good.head_bias)
    assert not list(tmp_path.glob(".tmp-*")), "atomic save must leave no temp file"


def test_serialization_is_byte_for_byte_repeatable(good):
    # The version is the sha256 of these bytes: the same delta must never make two versions.
    data = delta_io.to_bytes(good)
    assert all(delta_io.to_bytes(good) == data for _ in range(5))
    assert delta_io.to_bytes(delta_io.parse(data).delta) == data


def test_save_is_atomic_when_serialization_fails(good, tmp_path, monkeypatch):
    target = tmp_path / "t.safetensors"
    delta_io.save(good, target)
    before = target.read_bytes()

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(delta_io.os, "fsync", boom)
    with pytest.raises(OSError):
        delta_io.save(good.replace(scheme="other"), target)
    assert target.read_bytes() == before and not list(tmp_path.glob(".tmp-*"))


def test_engine_accepts_good_delta(engine, good):
    engine.tasks.check(good)


@pytest.mark.parametrize("mutate, message", [
    (lambda raw, d: raw[:-7], "not a valid safetensors file"),
    (lambda raw, d: raw[:20], "truncated"),
    (lambda raw, d: b"\x80\x04\x95pickle-bytes", "header"),
    (lambda raw, d: b"abc", "only 3 bytes"),
    (lambda raw, d: struct.pack("<Q", 1 << 30) + b"{}", "exceeds"),
    (lambda raw, d: struct.pack("<Q", 9) + b"[1,2,3,4]", "not a JSON object"),
    (lambda raw, d: _raw(d, format="bitfit-delta/99"), "unsupported format version"),
    (lambda raw, d: _raw(d, labels=None), "labels"),
    (lambda raw, d: _raw(d, labels='["a","b"]'), "3 output rows but 2 labels"),
    (lambda raw, d: _raw(d, labels='["a","a","b"]'), "duplicate label"),
    (lambda raw, d: _raw(d, labels='not json'), "labels: not valid JSON"),
    (lambda raw, d: _raw(d, problem_type="ranking"), "problem_type"),
    (lambda raw, d: _raw(d, pooling="max"), "pooling"),
    (lambda raw, d: _raw(d, task="../etc/passwd"), "not a valid task name"),
    (lambda raw, d: _raw(d, max_length="lots"), "max_length"),
    (lambda raw, d: _raw(d, inputs='["a","b","c"]'), "inputs"),
    (lambda raw, d: _raw(d, {"head.weight": d.head_weight}), "head.bias: missing"),
    (lambda raw, d: _raw(d, {**d.sites, "head.weight": d.head_weight.half(), "head.bias": d.head_bias}),
     "is not F32"),
    (lambda raw, d: _raw(d, {**d.sites, "head.weight": d.head_weight, "head.bias": d.head_bias,
                              "encoder.layer.0.output.dense.bias": torch.full((32,), float("nan"))}),
     "NaN or Inf"),
    (lambda raw, d: _raw(d, {**d.sites, "head.weight": d.head_weight, "head.bias": d.head_bias,
                              "encoder.layer.0.output.dense.bias": torch.zeros(2, 16)}), "non-empty vector"),
    (lambda raw, d: _raw(d, {**d.sites, "head.weight": d.head_weight[0], "head.bias": d.head_bias}),
     "expected head.weight [C, H]"),
])
def test_malformed_files_are_rejected_with_named_problem(good, mutate, message):
    raw = delta_io.to_bytes(good)
    with pytest.raises(InvalidDelta, match=message.replace("[", r"\[").replace("]", r"\]")
                       .replace(".", r"\.")):
        delta_io.parse(mutate(raw, good)).delta


def test_duplicate_header_keys_are_rejected(good):
    raw = delta_io.to_bytes(good)
    (n,) = struct.unpack("<Q", raw[:8])
    header = raw[8:8 + n].decode().rstrip()  # safetensors pads the header with spaces
    first = header.index('"head.bias"')
    entry_end = header.index("}", first) + 1
    doubled = header[:-1] + "," + header[first:entry_end] + "}"
    data = struct.pack("<Q", len(doubled)) + doubled.encode() + raw[8 + n:]
    with pytest.raises(InvalidDelta, match="duplicate key 'head.bias'"):
        delta_io.parse(data).delta


def test_missing_metadata_is_not_a_bitfit_delta(good):
    data = st_save({"head.weight": good.head_weight, "head.bias": good.head_bias})
    with pytest.raises(InvalidDelta, match="__metadata__ missing"):
        delta_io.parse(data).delta


def test_unreadable_path(tmp_path):
    with pytest.raises(InvalidDelta, match="cannot read delta file"):
        delta_io.load(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("change, error, message", [
    (dict(base_fingerprint="0" * 64), BaseModelMismatch, "base_fingerprint"),
    (dict(architecture="roberta"), BaseModelMismatch, "architecture"),
    (dict(sites={"encoder.layer.7.output.dense.bias": torch.zeros(32)}), InvalidDelta, "not a known site"),
    (dict(sites={"encoder.layer.0.attention.self.query.weight": torch.zeros(32)}), InvalidDelta,
     "weight matrices are not servable"),
    (dict(sites={"encoder.layer.0.intermediate.dense.bias": torch.zeros(32)}), InvalidDelta,
     r"shape \[32\] does not match the base's \[64\]"),
    (dict(head_weight=torch.zeros(3, 16)), InvalidDelta, "does not match hidden size 32"),
])
def test_base_checks_name_the_problem(engine, good, change, error, message):
    with pytest.raises(error, match=message):
        engine.tasks.check(good.replace(**change))


def test_rejected_delta_leaves_engine_untouched(engine, good, tiny_bert_dir):
    engine.add_task(good)
    before = engine.predict([("good", "hello world")])[0]
    bad = good.replace(base_fingerprint="f" * 64)
    with pytest.raises(BaseModelMismatch):
        engine.add_task(bad)
    with pytest.raises(InvalidDelta):
        engine.add_task(b"garbage")
    assert engine.predict([("good", "hello world")])[0] == before


def test_header_is_documented_json(good):
    header, meta = delta_io.read_header(delta_io.to_bytes(good))
    assert meta["format"] == delta_io.FORMAT
    assert json.loads(meta["labels"]) == list(good.labels)
    assert set(header) == {*good.sites, "head.weight", "head.bias"}


def test_no_pickle_in_package():
    root = Path(__file__).resolve().parents[1] / "bitfit_serve"
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text and "torch.load(" not in text, path
