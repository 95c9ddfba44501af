"""Errors, atomic file io, seeds, multi-process helpers and training safety handlers."""
