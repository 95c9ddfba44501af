"""Downstream segmentation: networks, case lists, regimes, the study runner and its metrics."""
