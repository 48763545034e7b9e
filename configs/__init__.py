"""Experiment configs: `base.py` declares every key; the other files override a few."""
