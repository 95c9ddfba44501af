"""Shared library of the MedGen3D bundles: core, data, diffusion, masks, images, seg."""
