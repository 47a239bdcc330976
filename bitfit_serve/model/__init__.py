"""The frozen encoder: base weights (base.py), per-row banks (banks.py), functional forward (encoder.py)."""
