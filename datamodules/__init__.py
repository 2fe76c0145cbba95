"""Chest X-ray data: image decoding, transforms, MIMIC-CXR, MS-CXR and ChestX-ray14 readers, latent cache."""

from datamodules.datamodule import CXRDataModule, GroundingSource
from datamodules.image_io import DecodeMode, ImageDecodeError, read_grayscale
from datamodules.latent_cache import LatentDtype

__all__ = ["CXRDataModule", "DecodeMode", "GroundingSource", "ImageDecodeError", "LatentDtype", "read_grayscale"]
