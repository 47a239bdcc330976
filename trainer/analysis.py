"""How much training moved each bias: per-layer, per-site mean |b0 - bF| (BitFit paper, Fig. 1).

    bitfit-train heatmap deltas/rte.safetensors --out benchmarks/results/bias_change_rte.png
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from bitfit_serve.model.architectures import LAYER_SITES

# The bias sites of one encoder layer (paper notation -> HF name), in forward order.
BIAS_SITES = {kind: name for kind, name in LAYER_SITES.items() if name.endswith(".bias")}
_LAYER_RE = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")


def bias_change(trained: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor],
                num_layers: int) -> np.ndarray:
    """[len(BIAS_SITES), num_layers] mean |b0 - bF| per site and layer (NaN where not trained)."""
    out = np.full((len(BIAS_SITES), num_layers), np.nan)
    rows = {suffix: i for i, suffix in enumerate(BIAS_SITES.values())}
    for name, value in trained.items():
        m = _LAYER_RE.match(name)
        if m and m.group(2) in rows:
            diff = (value.detach().float() - base[name].detach().float()).abs().mean()
            out[rows[m.group(2)], int(m.group(1))] = float(diff)
    return out


def qkv_comparison(change: np.ndarray) -> dict[str, float]:
    """Mean change of the query, key and value biases over layers (the value-bias question)."""
    names = list(BIAS_SITES)
    return {site: float(np.nanmean(change[names.index(site)])) for site in ("bq", "bk", "bv")}


def plot_heatmap(change: np.ndarray, title: str, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * change.shape[1], 4.2))
    image = ax.imshow(change, cmap="viridis", aspect="auto")
    ax.set_xticks(range(change.shape[1]), [str(i) for i in range(change.shape[1])])
    ax.set_yticks(range(change.shape[0]), [f"{k} ({v.split('.')[-2]})" if k.startswith("bln") else k
                                           for k, v in BIAS_SITES.items()])
    ax.set_xlabel("layer")
    ax.set_title(title, fontsize=10)
    for (i, j), v in np.ndenumerate(change):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=7,
                    color="white" if v < np.nanmax(change) * 0.6 else "black")
    fig.colorbar(image, ax=ax, label="mean |b0 - bF|")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
