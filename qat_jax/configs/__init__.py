"""Experiment configs, shipped inside the package (so that no top-level `configs` module is
installed beside a user's own): `base.py` declares every key; the other files override a few.
`--config=configs/NAME.py[:ARG]` names one of them from any directory (cli._resolve_config)."""
