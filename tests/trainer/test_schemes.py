"""Trainable-parameter selection: exact counts on the real MiniLM, anchored names, masks."""

import pytest
import torch

from bitfit_serve.model.base import load_hf_base
from trainer import schemes

# all-MiniLM-L6-v2: 6 layers, hidden 384, intermediate 1536.
# bitfit (mean/cls pooling, no pooler bias): embeddings LN beta 384 + 6 x (q,k,v 3x384 + attn-out 384
# + LN1 beta 384 + intermediate 1536 + output 384 + LN2 beta 384) = 384 + 6 x 4224 = 25,728.
MINILM_COUNTS = {
    "bitfit": 25_728,
    "bq_bm2": 11_520,          # 6 x (384 + 1536)
    "bq": 2_304, "bk": 2_304, "bv": 2_304,
    "bm2": 9_216,              # 6 x 1536
    "ln_gamma1": 2_304, "ln_gamma2": 2_304,
    "ln_gamma12": 4_608,       # layer LayerNorm gammas only (no embeddings LayerNorm)
    "gamma_bitfit": 30_720,    # bitfit + every LayerNorm gamma (4,992 incl. embeddings)
    "gamma_bq_bm2": 16_512,    # bq_bm2 + every LayerNorm gamma
    "ln_bias": 4_992,          # every LayerNorm beta incl. embeddings
    "no_bq_bm2": 14_208,       # bitfit minus bq_bm2
    "rand_bias": 11_520,       # random bias entries, bq_bm2's budget by default
    "rand_uniform": 25_728,    # random weight-matrix entries, bitfit's budget
    "frozen": 0,               # head only
}


@pytest.fixture(scope="module")
def minilm_params():
    _, _, model = load_hf_base(None)
    return dict(model.named_parameters())


@pytest.mark.parametrize("scheme,count", sorted(MINILM_COUNTS.items()))
def test_minilm_counts_mean_pooling(minilm_params, scheme, count):
    assert schemes.select(scheme, minilm_params, "mean").count(minilm_params) == count


def test_pooler_bias_only_with_pooler_pooling(minilm_params):
    # Every "all biases" scheme adds pooler.dense.bias (384) exactly when the pooler is used.
    for scheme in ("bitfit", "gamma_bitfit", "no_bq_bm2"):
        with_pooler = schemes.select(scheme, minilm_params, "pooler")
        assert "pooler.dense.bias" in with_pooler.names
        assert with_pooler.count(minilm_params) == MINILM_COUNTS[scheme] + 384
        assert "pooler.dense.bias" not in schemes.select(scheme, minilm_params, "cls").names
    assert schemes.select("bitfit", minilm_params, "pooler").count(minilm_params) == 26_112
    for scheme in ("bq_bm2", "bv", "ln_bias", "ln_gamma12", "frozen"):
        assert "pooler.dense.bias" not in schemes.select(scheme, minilm_params, "pooler").names


def test_all_layernorm_gammas_4992(minilm_params):
    gammas = schemes.pattern(schemes.ALL_GAMMAS)
    assert sum(p.numel() for n, p in minilm_params.items() if gammas.match(n)) == 4_992


def test_full_counts(minilm_params):
    total = sum(p.numel() for p in minilm_params.values())
    pooler = sum(p.numel() for n, p in minilm_params.items() if n.startswith("pooler."))
    assert schemes.select("full", minilm_params, "pooler").count(minilm_params) == total == 22_713_216
    assert schemes.select("full", minilm_params, "mean").count(minilm_params) == total - pooler


def test_rand_row_col_budget(minilm_params):
    sel = schemes.select("rand_row_col", minilm_params, "mean", seed=3)
    count = sel.count(minilm_params)
    assert 25_728 <= count < 25_728 + 1536  # overshoots by less than one row/column
    for name, mask in sel.masks.items():  # whole rows or whole columns only
        m = mask.bool()
        full_rows, full_cols = m.all(1), m.all(0)
        covered = full_rows.unsqueeze(1) | full_cols.unsqueeze(0)
        assert torch.equal(m, covered), name


def test_anchored_names_do_not_catch_neighbours(minilm_params):
    bm3 = schemes.select("bq", minilm_params, "mean").names
    assert all(n.endswith("attention.self.query.bias") for n in bm3)
    names = schemes.pattern(("bm3",))
    assert names.match("encoder.layer.0.output.dense.bias")
    assert not names.match("encoder.layer.0.attention.output.dense.bias")  # the substring-matching bug
    assert not names.match("encoder.layer.0.output.dense.bias.extra")
    gamma2 = schemes.pattern(("gamma2",))
    assert not gamma2.match("encoder.layer.0.attention.output.LayerNorm.weight")


def test_random_schemes_are_seeded(minilm_params):
    a = schemes.select("rand_bias", minilm_params, "mean", seed=1)
    b = schemes.select("rand_bias", minilm_params, "mean", seed=1)
    c = schemes.select("rand_bias", minilm_params, "mean", seed=2)
    assert a.names == b.names and all(torch.equal(a.masks[n], b.masks[n]) for n in a.names)
    assert any(not torch.equal(a.masks[n], c.masks.get(n, torch.zeros_like(a.masks[n]))) for n in a.names)


def test_unknown_scheme():
    with pytest.raises(ValueError, match="unknown scheme"):
        schemes.select("bitfit2", {}, "mean")
