"""Datasets nfdet generates itself (no downloads): drawn shapes for the demo and smoke tests."""

from .synthetic import (
    CATEGORIES,
    GENERATOR_VERSION,
    MANIFEST_NAME,
    Scene,
    SyntheticData,
    SyntheticDataParams,
    make_synthetic_data,
    render_classification_image,
    render_scene,
    synthetic_data_paths,
)

__all__ = [
    "CATEGORIES",
    "GENERATOR_VERSION",
    "MANIFEST_NAME",
    "Scene",
    "SyntheticData",
    "SyntheticDataParams",
    "make_synthetic_data",
    "render_classification_image",
    "render_scene",
    "synthetic_data_paths",
]
