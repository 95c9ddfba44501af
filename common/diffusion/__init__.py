"""Diffusion over MONAI schedulers: training targets, the sampling loop, seeded batches."""
