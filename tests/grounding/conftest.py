"""Tiny diffusers U-Nets for the grounding tests, built from config dicts with seeded weights."""

from collections.abc import Callable

import pytest
import torch
from diffusers import UNet2DConditionModel

# Two resolutions (16x16 and 8x8 at a 16x16 latent) and seven attn2 layers: 2 down, 1 mid, 4 up.
TINY_UNET_CONFIG = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 16,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
}
TINY_NUM_TOKENS = 12

# The training scheduler of Stable Diffusion 1.5 (DDPM, 1000 steps, scaled-linear betas).
SD15_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def build_tiny_unet(seed: int = 0, **overrides: object) -> UNet2DConditionModel:
    """Build the tiny U-Net in eval mode with weights drawn from `seed`."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**{**TINY_UNET_CONFIG, **overrides})
    return unet.eval()


@pytest.fixture(scope="module")
def tiny_unet() -> UNet2DConditionModel:
    return build_tiny_unet()


@pytest.fixture(scope="module")
def sd15_layout_unet() -> UNet2DConditionModel:
    """The Stable Diffusion 1.5 block layout (16 attn2 layers) with narrow channels."""
    return build_tiny_unet(
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        norm_num_groups=4,
        attention_head_dim=2,
    )


@pytest.fixture(scope="session")
def tiny_unet_factory() -> Callable[..., UNet2DConditionModel]:
    """`build_tiny_unet`, for tests that need another seed or config (test modules cannot
    import this conftest by name, because other test folders have a conftest.py too)."""
    return build_tiny_unet


@pytest.fixture(scope="session")
def num_tokens() -> int:
    return TINY_NUM_TOKENS


@pytest.fixture(scope="session")
def cross_attention_dim() -> int:
    return TINY_UNET_CONFIG["cross_attention_dim"]


@pytest.fixture(scope="module")
def scheduler_config() -> dict[str, object]:
    return dict(SD15_SCHEDULER_CONFIG)
