"""Evaluations and plots."""
