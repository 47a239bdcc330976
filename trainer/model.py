"""The trained function: HF base model (HF names) + pooling + Linear head.

This is exactly what the engine serves for a delta (``bitfit_serve.model.encoder``: ``encode``,
``pool``, ``classify``), so the values the trainer learns are the values the server runs.
"""

from __future__ import annotations

import torch
from torch import nn


class Classifier(nn.Module):
    """logits[i] = head(pool(base(tokens[i])))  ->  [B, C]  (C = 1 for regression)."""

    def __init__(self, base: nn.Module, pooling: str, num_outputs: int):
        super().__init__()
        if pooling not in ("mean", "cls", "pooler"):
            raise ValueError(f"pooling: {pooling!r} is not one of mean, cls, pooler")
        if pooling == "pooler" and getattr(base, "pooler", None) is None:
            raise ValueError("pooling 'pooler' needs a base model with a pooler (pooler.dense)")
        self.base = base
        self.pooling = pooling
        self.head = nn.Linear(base.config.hidden_size, num_outputs)
        # BERT's classifier init: N(0, initializer_range) weights, zero bias.
        nn.init.normal_(self.head.weight, std=base.config.initializer_range)
        nn.init.zeros_(self.head.bias)

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               token_type_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] token ids -> [B, H] pooled representation."""
        hidden = self.base(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=token_type_ids).last_hidden_state  # [B, T, H]
        if self.pooling == "pooler":
            return self.base.pooler(hidden)  # tanh(dense(hidden[:, 0]))
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled(input_ids, attention_mask, token_type_ids))
