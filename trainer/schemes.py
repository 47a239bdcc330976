"""Which parameters a scheme trains: anchored regexes on HF base-model names, plus entry masks.

Site names follow the BitFit paper's notation for one BERT layer:

    bq, bk, bv   attention.self.{query,key,value}.bias
    bm1          attention.output.dense.bias        (the attention output projection)
    bln1         attention.output.LayerNorm.bias    gamma1 = attention.output.LayerNorm.weight
    bm2          intermediate.dense.bias            (the 4H-wide MLP bias)
    bm3          output.dense.bias
    bln2         output.LayerNorm.bias              gamma2 = output.LayerNorm.weight

Every pattern is anchored (``^...$``): the original BitFit code matched substrings, so
``output.dense.bias`` also caught ``attention.output.dense.bias``.

The pooler (``pooler.dense``) only influences the output when ``pooling == "pooler"``; bias
schemes that train "every bias" include ``pooler.dense.bias`` exactly then (the paper's setting),
so ``bitfit`` trains 25,728 values on MiniLM with mean/cls pooling and 26,112 with the pooler.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch

from bitfit_serve.model.architectures import LAYER_PREFIX, LAYER_SITES, MODEL_SITES, site_pattern

_LAYER = LAYER_PREFIX
_SITE = {kind: site_pattern(kind) for kind in (*LAYER_SITES, *MODEL_SITES)}  # the runtime's site table
ALL_BIASES = ("emb_bln", "bq", "bk", "bv", "bm1", "bln1", "bm2", "bm3", "bln2", "pooler")
ALL_GAMMAS = ("emb_gamma", "gamma1", "gamma2")

# scheme -> the site groups it trains (the pooler group is dropped unless pooling == "pooler").
_GROUPS: dict[str, tuple[str, ...]] = {
    "bitfit": ALL_BIASES,
    "bq_bm2": ("bq", "bm2"),
    "bq": ("bq",),
    "bk": ("bk",),
    "bv": ("bv",),
    "bm2": ("bm2",),
    "ln_gamma1": ("gamma1",),
    "ln_gamma2": ("gamma2",),
    "ln_gamma12": ("gamma1", "gamma2"),
    "gamma_bitfit": ALL_BIASES + ALL_GAMMAS,
    "gamma_bq_bm2": ("bq", "bm2") + ALL_GAMMAS,
    "ln_bias": ("emb_bln", "bln1", "bln2"),
    "no_bq_bm2": tuple(g for g in ALL_BIASES if g not in ("bq", "bm2")),
    "rand_bias": ALL_BIASES,  # candidates; a random subset of their entries is trained
    "frozen": (),
}
# Weight-matrix baselines: random entries / whole rows+columns of the encoder's Linear weights.
_WEIGHT_MATRIX = re.compile(r"^" + _LAYER + r".*\.weight$")
RESEARCH_ONLY = ("rand_uniform", "rand_row_col")
SCHEMES = tuple(_GROUPS) + RESEARCH_ONLY + ("full",)
SERVABLE = tuple(_GROUPS)  # writes a delta; RESEARCH_ONLY writes a run record; full a checkpoint


def pattern(groups: tuple[str, ...]) -> re.Pattern[str]:
    """One anchored regex matching the HF names of the given site groups."""
    return re.compile("^(?:" + "|".join(_SITE[g] for g in groups) + ")$")


@dataclass(frozen=True)
class Selection:
    """The trainable part of the base model for one run (the head is always trained too).

    ``masks`` restrict training to some entries of a parameter (1 = trained): the gradient is
    multiplied by the mask, and with weight decay 0 AdamW then leaves masked entries unchanged.
    """

    scheme: str
    names: tuple[str, ...]  # HF base names with requires_grad
    masks: Mapping[str, torch.Tensor]  # name -> 0/1 float mask, same shape as the parameter

    def count(self, params: Mapping[str, torch.Tensor]) -> int:
        """Number of trained base-model values (masked entries excluded, head excluded)."""
        return sum(int(self.masks[n].sum()) if n in self.masks else params[n].numel() for n in self.names)


def bias_groups(scheme: str, pooling: str) -> tuple[str, ...]:
    groups = _GROUPS[scheme]
    return tuple(g for g in groups if g != "pooler" or pooling == "pooler")


def select(scheme: str, params: Mapping[str, torch.Tensor], pooling: str, seed: int = 0,
           rand_count: int | None = None) -> Selection:
    """Pick the trainable base parameters of ``scheme``.

    ``rand_count`` sets how many entries the random schemes train; by default ``rand_bias`` uses
    the ``bq_bm2`` count (is the choice of *which* biases what matters?) and ``rand_uniform`` /
    ``rand_row_col`` the ``bitfit`` count (the paper's same-budget baselines).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    generator = torch.Generator().manual_seed(seed)
    if scheme == "full":
        names = tuple(n for n in params if pooling == "pooler" or not n.startswith("pooler."))
        return Selection(scheme, names, {})
    if scheme in RESEARCH_ONLY:
        names = tuple(n for n in params if _WEIGHT_MATRIX.match(n) and params[n].dim() == 2)
        budget = rand_count or select("bitfit", params, pooling).count(params)
        make = _uniform_masks if scheme == "rand_uniform" else _row_col_masks
        return Selection(scheme, names, make({n: params[n].shape for n in names}, budget, generator))
    regex = pattern(bias_groups(scheme, pooling)) if _GROUPS[scheme] else None
    names = tuple(n for n in params if regex is not None and regex.match(n))
    if scheme != "rand_bias":
        return Selection(scheme, names, {})
    budget = rand_count or select("bq_bm2", params, pooling).count(params)
    masks = _uniform_masks({n: params[n].shape for n in names}, budget, generator)
    return Selection(scheme, tuple(n for n in names if masks[n].any()), {n: m for n, m in masks.items() if m.any()})


def _uniform_masks(shapes: Mapping[str, torch.Size], budget: int, generator: torch.Generator
                   ) -> dict[str, torch.Tensor]:
    """Exactly ``budget`` entries, uniformly at random over all entries of all given parameters."""
    sizes = [s.numel() for s in shapes.values()]
    total = sum(sizes)
    if budget > total:
        raise ValueError(f"cannot pick {budget} entries out of {total}")
    flat = torch.zeros(total)
    flat[torch.randperm(total, generator=generator)[:budget]] = 1.0
    return {n: chunk.view(shape).clone() for (n, shape), chunk in zip(shapes.items(), flat.split(sizes))}


def _row_col_masks(shapes: Mapping[str, torch.Size], budget: int, generator: torch.Generator
                   ) -> dict[str, torch.Tensor]:
    """Whole rows or columns of randomly chosen matrices until at least ``budget`` entries are on.

    The count overshoots ``budget`` by less than one row/column; ``Selection.count`` reports it.
    """
    names = list(shapes)
    masks = {n: torch.zeros(shapes[n]) for n in names}
    on = 0
    while on < budget:
        name = names[int(torch.randint(len(names), (1,), generator=generator))]
        mask = masks[name]
        axis = int(torch.randint(2, (1,), generator=generator))
        index = int(torch.randint(mask.shape[axis], (1,), generator=generator))
        line = mask[index] if axis == 0 else mask[:, index]
        on += int(line.numel() - line.sum())
        line.fill_(1.0)
    return masks


def apply(selection: Selection, model: torch.nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
    """Set requires_grad on ``model`` (an HF base model) and hook the entry masks onto gradients."""
    chosen = set(selection.names)
    handles = []
    for name, p in model.named_parameters():
        p.requires_grad_(name in chosen)
        if name in selection.masks:
            mask = selection.masks[name].to(p.device)
            handles.append(p.register_hook(lambda grad, mask=mask: grad * mask))
    return handles
