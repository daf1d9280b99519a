"""Sweeps: a search over training configs, run as trials on one bus (see ``driver``)."""
