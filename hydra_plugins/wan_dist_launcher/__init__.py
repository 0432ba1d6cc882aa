"""Hydra launcher plugins of wan_dist (found by Hydra through the hydra_plugins namespace package)."""
