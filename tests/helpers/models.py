"""Configs of tiny models for the tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_HIDDEN_SIZE = 32


def tiny_unet_config(cross_attention_dim: int = TINY_HIDDEN_SIZE, sample_size: int = 32) -> dict[str, Any]:
    """A two-level U-Net with cross-attention at both resolutions (about 0.6 M parameters)."""
    return {
        "sample_size": sample_size,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": cross_attention_dim,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    }


def demo_unet_config() -> dict[str, Any]:
    """The U-Net of configs/demo.yaml (1.7 M parameters, cross-attention at 16x16 and 8x8)."""
    return {
        "sample_size": 32,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "cross_attention_dim": 64,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    }


def phantom_datamodule(root: Path, phantom_options: dict[str, Any], **kwargs: Any) -> Any:
    """A demo ``CXRDataModule`` on 32 px phantoms under ``root``, without worker processes."""
    from datamodules.datamodule import CXRDataModule

    settings = {
        "demo": True,
        "demo_root": str(root / "phantoms"),
        "demo_options": phantom_options,
        "image_size": 32,
        "num_workers": 0,
        "pin_memory": False,
        "persistent_workers": False,
        "work_dir": str(root / "data"),
    }
    return CXRDataModule(**{**settings, **kwargs})


def quiet_trainer(root: Path, **kwargs: Any) -> Any:
    """A CPU ``Trainer`` without logger, checkpoints, progress bar or model summary."""
    import lightning as L

    settings = {
        "default_root_dir": root,
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return L.Trainer(**{**settings, **kwargs})
