"""Shared code of the MedGen3D bundles: data, transforms, sequences, diffusion, metrics, io."""
