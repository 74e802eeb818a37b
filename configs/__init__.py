"""Experiment configs: ml_collections `get_config(arg)` files, one per experiment family."""
