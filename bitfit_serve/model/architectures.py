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

# Sites a delta may change: every bias and every LayerNorm gamma/beta of the base model.
# Anchored on purpose: substring matching would let `output.dense.bias` catch the attention output.
SITE_RE = re.compile(
    r"^(?:embeddings\.LayerNorm\.(?:weight|bias)"
    r"|encoder\.layer\.\d+\.(?:"
    r"attention\.self\.(?:query|key|value)\.bias"
    r"|attention\.output\.dense\.bias"
    r"|attention\.output\.LayerNorm\.(?:weight|bias)"
    r"|intermediate\.dense\.bias"
    r"|output\.dense\.bias"
    r"|output\.LayerNorm\.(?:weight|bias))"
    r"|pooler\.dense\.bias)$"
)


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
