"""Mask generation (MC-DPM): windows of axial slices, the network, sampling, mask metrics."""
