"""Bank row allocation, growth and reuse: table-driven where the logic is an index helper."""

from __future__ import annotations

import torch

from bitfit_serve.model.banks import Banks
from tests.factories import random_delta


def _banks(tiny_bert_dir, hf_base, capacity=2):
    base_sites = {n: p.detach() for n, p in hf_base.named_parameters()
                  if n.endswith(".bias") or "LayerNorm" in n}
    return Banks(base_sites, hf_base.config.hidden_size, torch.device("cpu"), torch.float32, capacity), base_sites


def test_rows_start_at_one_and_are_reused_after_free(tiny_bert_dir):
    from bitfit_serve.model.base import load_hf_base

    _, _, hf = load_hf_base(tiny_bert_dir)
    banks, _ = _banks(tiny_bert_dir, hf)
    rows = [banks.allocate() for _ in range(5)]
    assert rows == [1, 2, 3, 4, 5] and banks.capacity == 8
    banks.free(3)
    assert banks.allocate() == 3
    assert banks.rows_in_use == 5


def test_growth_keeps_rows_and_free_resets_to_base(tiny_bert_dir):
    from bitfit_serve.model.base import load_hf_base

    _, _, hf = load_hf_base(tiny_bert_dir)
    banks, base_sites = _banks(tiny_bert_dir, hf)
    a = random_delta(tiny_bert_dir, "a", sites=["encoder.layer.0.output.dense.bias"], num_labels=2, hf_base=hf)
    b = random_delta(tiny_bert_dir, "b", sites=["encoder.layer.1.attention.self.key.bias"], num_labels=4,
                     seed=1, hf_base=hf)
    ra = banks.allocate()
    banks.write(ra, a)
    rb = banks.allocate()
    banks.write(rb, b)  # banks a new site and widens the head: rebuild must keep row a
    for _ in range(6):
        banks.allocate()  # grow 2 -> 4 -> 8
    v = banks.view()
    assert torch.equal(v.sites["encoder.layer.0.output.dense.bias"][ra], a.sites["encoder.layer.0.output.dense.bias"])
    # b did not train a's site: its row holds the base value there, and vice versa
    assert torch.equal(v.sites["encoder.layer.0.output.dense.bias"][rb], base_sites["encoder.layer.0.output.dense.bias"])
    assert torch.equal(v.sites["encoder.layer.1.attention.self.key.bias"][ra],
                       base_sites["encoder.layer.1.attention.self.key.bias"])
    assert torch.equal(v.head_weight[ra, :2], a.head_weight) and not v.head_weight[ra, 2:].any()
    assert v.num_labels[ra] == 2 and v.num_labels[rb] == 4
    # row 0 always holds the base
    for name, bank in v.sites.items():
        assert torch.equal(bank[0], base_sites[name])

    banks.free(ra)
    v = banks.view()
    for name, bank in v.sites.items():
        assert torch.equal(bank[ra], base_sites[name]), name
    assert not v.head_weight[ra].any() and not v.head_bias[ra].any()


def test_nbytes_counts_banked_sites_and_heads(tiny_bert_dir):
    from bitfit_serve.model.base import load_hf_base

    _, _, hf = load_hf_base(tiny_bert_dir)
    banks, _ = _banks(tiny_bert_dir, hf, capacity=4)
    d = random_delta(tiny_bert_dir, "a", sites=["encoder.layer.0.intermediate.dense.bias"], num_labels=3, hf_base=hf)
    banks.write(banks.allocate(), d)
    # one banked site of 64 floats + head 3x32 + 3 + label count + pooling code, per row
    assert banks.bytes_per_row == 64 * 4 + (3 * 32 + 3) * 4 + 8 + 8
    assert banks.nbytes == 4 * banks.bytes_per_row
