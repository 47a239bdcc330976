"""Train BitFit deltas (and the paper's variants and baselines) for bitfit-serve."""

__version__ = "0.1.0"
