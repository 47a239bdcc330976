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
    head_a = v.heads[v.row_width[ra]]
    assert v.row_width[ra] == 2 and v.row_width[rb] == 4  # each head in its own width class
    assert torch.equal(head_a.weight[v.row_slot[ra]], a.head_weight)
    assert v.num_labels[ra] == 2 and v.num_labels[rb] == 4
    # row 0 always holds the base
    for name, bank in v.sites.items():
        assert torch.equal(bank[0], base_sites[name])

    banks.free(ra)
    v = banks.view()
    for name, bank in v.sites.items():
        assert torch.equal(bank[ra], base_sites[name]), name
    assert v.row_width[ra] == 0 and 2 not in v.heads  # a's class was left empty: dropped


def test_nbytes_counts_banked_sites_and_heads(tiny_bert_dir):
    from bitfit_serve.model.base import load_hf_base

    _, _, hf = load_hf_base(tiny_bert_dir)
    banks, _ = _banks(tiny_bert_dir, hf, capacity=4)
    d = random_delta(tiny_bert_dir, "a", sites=["encoder.layer.0.intermediate.dense.bias"], num_labels=3, hf_base=hf)
    banks.write(banks.allocate(), d)
    # per row: one banked site of 64 floats + label count + pooling code; the 3-label head sits
    # in the 4-wide class (4 x 32 + 4 floats a slot), which starts with 8 slots
    assert banks.bytes_per_row == 64 * 4 + 8 + 8
    assert banks.head_bytes(3) == (4 * 32 + 4) * 4
    assert banks.nbytes == 4 * banks.bytes_per_row + 8 * banks.head_bytes(3)


def test_a_wide_head_pays_for_its_own_width_and_its_memory_goes_when_it_leaves(tiny_bert_dir):
    """Issue 19, finding 1: one head bank padded to the widest task made every row pay for a
    10,000-label upload, and kept it after the delete."""
    from bitfit_serve.model.base import load_hf_base

    _, _, hf = load_hf_base(tiny_bert_dir)
    banks, _ = _banks(tiny_bert_dir, hf, capacity=8)  # room for the wide task's row: no growth
    narrow = [random_delta(tiny_bert_dir, f"n{i}", num_labels=2, seed=i, hf_base=hf) for i in range(3)]
    rows = []
    for d in narrow:
        rows.append(banks.allocate())
        banks.write(rows[-1], d)
    before, per_row = banks.nbytes, banks.bytes_per_row
    wide = random_delta(tiny_bert_dir, "wide", num_labels=1000, seed=9, hf_base=hf)
    predicted = banks.bytes_after(wide)
    row = banks.allocate()
    banks.write(row, wide)
    assert banks.nbytes == predicted  # the budget check's projection is exact
    assert banks.bytes_per_row == per_row  # other rows pay nothing for it
    assert banks.nbytes - before == banks.head_bytes(1000) == 1024 * (32 + 1) * 4  # one 1,024-wide slot
    v = banks.view()
    assert torch.equal(v.heads[1024].weight[v.row_slot[row], :1000], wide.head_weight)
    assert not v.heads[1024].weight[v.row_slot[row], 1000:].any()
    banks.free(row)
    assert banks.nbytes == before and 1024 not in banks.view().heads
    for r, d in zip(rows, narrow):  # the narrow heads were never moved
        assert torch.equal(banks.view().heads[2].weight[banks.view().row_slot[r]], d.head_weight)


def test_a_width_class_grows_by_itself_and_slots_are_reused(tiny_bert_dir):
    from bitfit_serve.model.base import load_hf_base

    _, _, hf = load_hf_base(tiny_bert_dir)
    banks, _ = _banks(tiny_bert_dir, hf, capacity=4)
    deltas = [random_delta(tiny_bert_dir, f"w{i}", num_labels=100, seed=i, hf_base=hf) for i in range(3)]
    rows = []
    for d in deltas:  # the 128-wide class starts with one slot: 1 -> 2 -> 4
        predicted = banks.bytes_after(d)
        rows.append(banks.allocate())
        banks.write(rows[-1], d)
        assert banks.nbytes == predicted
    v = banks.view()
    assert v.heads[128].weight.shape[0] == 4
    for r, d in zip(rows, deltas):
        assert torch.equal(v.heads[128].weight[v.row_slot[r], :100], d.head_weight)
    slot = v.row_slot[rows[1]]
    banks.free(rows[1])
    again = banks.allocate()
    banks.write(again, deltas[1])
    assert banks.view().row_slot[again] == slot
