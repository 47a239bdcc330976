"""Architecture adapters: what differs between BERT-family encoders, and nothing else.

The functional encoder (``encoder.py``) is shared; an adapter names the servable sites and
computes position ids. BERT and RoBERTa use the same parameter names under their base model;
RoBERTa numbers positions from ``padding_idx + 1`` and skips pad tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

# The one table of servable sites: every bias and every LayerNorm gamma/beta of a BERT-family
# base, keyed by the BitFit paper's notation for one layer (bq ... bln2; gamma1/gamma2 are the
# LayerNorm weights), plus the embeddings' LayerNorm and the pooler. Values are HF parameter names
# inside one encoder layer (``LAYER_SITES``) or whole names (``MODEL_SITES``), in forward order.
LAYER_SITES = {
    "bq": "attention.self.query.bias",
    "bk": "attention.self.key.bias",
    "bv": "attention.self.value.bias",
    "bm1": "attention.output.dense.bias",
    "bln1": "attention.output.LayerNorm.bias",
    "gamma1": "attention.output.LayerNorm.weight",
    "bm2": "intermediate.dense.bias",
    "bm3": "output.dense.bias",
    "bln2": "output.LayerNorm.bias",
    "gamma2": "output.LayerNorm.weight",
}
MODEL_SITES = {
    "emb_bln": "embeddings.LayerNorm.bias",
    "emb_gamma": "embeddings.LayerNorm.weight",
    "pooler": "pooler.dense.bias",
}
LAYER_PREFIX = r"encoder\.layer\.\d+\."


def site_pattern(kind: str) -> str:
    """The anchored-ready regex (no ^/$) of one site kind, e.g. 'bq' -> encoder.layer.N.attention..."""
    if kind in LAYER_SITES:
        return LAYER_PREFIX + re.escape(LAYER_SITES[kind])
    return re.escape(MODEL_SITES[kind])


# Anchored on purpose: substring matching would let `output.dense.bias` catch the attention output.
SITE_RE = re.compile("^(?:" + "|".join(site_pattern(k) for k in (*LAYER_SITES, *MODEL_SITES)) + ")$")


def bert_position_ids(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """[B, T] -> [B, T]: 0..T-1 for every row (right padding never shifts real tokens)."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return positions.unsqueeze(0).expand_as(input_ids)


def roberta_position_ids(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """[B, T] -> [B, T]: pad tokens keep ``pad_token_id``, real tokens count from pad_token_id + 1."""
    is_token = input_ids.ne(pad_token_id).int()
    return (torch.cumsum(is_token, dim=1) * is_token).long() + pad_token_id


@dataclass(frozen=True)
class Architecture:
    name: str
    position_ids: Callable[[torch.Tensor, int], torch.Tensor]

    def is_site(self, name: str) -> bool:
        return SITE_RE.match(name) is not None


ARCHITECTURES: dict[str, Architecture] = {
    "bert": Architecture("bert", bert_position_ids),
    "roberta": Architecture("roberta", roberta_position_ids),
}


def architecture_for(model_type: str) -> Architecture:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise ValueError(f"unsupported architecture {model_type!r}; supported: {sorted(ARCHITECTURES)}") from None
