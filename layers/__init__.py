"""Flax NNX token mixers, one file per family (see DESIGN.md, "The mixer contract")."""
