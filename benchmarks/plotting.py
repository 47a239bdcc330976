"""The benchmarks' figures: matplotlib drawn off screen (files only, never a window), titled with
what ran where, written beside the JSON result as ``<name><suffix>.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def plot_path(args: argparse.Namespace, name: str) -> Path:
    return args.out / f"{name}{args.suffix}.png"


def subplots(panels: int, width: float = 11.0):
    """(figure, axes) of ``panels`` plots side by side, drawn off screen: files only, never a window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, panels, figsize=(width, 4))


def save_figure(fig, args: argparse.Namespace, name: str, title: str, *, threads: bool = True, extra: str = "",
                fontsize: float | None = None) -> None:
    """Title the figure with what ran where (model, device, dtype, this process's threads unless
    ``threads`` is False, then ``extra``) and write it beside the JSON, as ``<name><suffix>.png``."""
    label = [args.model, f"{args.device} {args.dtype}"] + ([f"{args.threads} threads"] if threads else [])
    fig.suptitle(f"{title} ({', '.join(label + ([extra] if extra else []))})", fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(plot_path(args, name), dpi=110)
