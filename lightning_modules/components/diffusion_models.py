"""Builders for the diffusers parts of the model: U-Net, VAE and noise scheduler.

Each part loads from a Stable Diffusion directory in diffusers layout (``unet/``, ``vae/``,
``scheduler/``) or a hub id, or is built from a config dict, as the demo and the tests do.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import nn

log = logging.getLogger(__name__)

SD15_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"

# The training schedule of Stable Diffusion 1.5, used when no scheduler config is given.
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "steps_offset": 1,
}


class MissingWeightsError(FileNotFoundError):
    """Raised when a configured model directory or hub id cannot be loaded."""


def _describe_missing(name_or_path: str, subfolder: str, option: str, error: Exception) -> MissingWeightsError:
    return MissingWeightsError(
        f"Could not load {subfolder or 'the model'} from {name_or_path!r} ({type(error).__name__}). "
        f"Set {option} to a local Stable Diffusion 1.5 directory in diffusers layout (with "
        f"{subfolder}/ inside), or to a hub id such as {SD15_HUB_ID!r} on a machine that can reach "
        "the hub; `hf download` (`huggingface-cli download` in older huggingface-hub releases) saves one for "
        "offline use. The configs read the directory from the SD15_DIR environment variable."
    )


def _check_path(name_or_path: str, option: str) -> None:
    looks_like_path = name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1
    if looks_like_path and not Path(name_or_path).expanduser().exists():
        raise MissingWeightsError(
            f"Model directory {name_or_path!r} (set by {option}) not found. Download Stable "
            f"Diffusion 1.5 in diffusers layout (for example `hf download {SD15_HUB_ID} "
            f"--local-dir {name_or_path}`) or point {option} at an existing copy (the configs read "
            "it from the SD15_DIR environment variable)."
        )


def load_unet(
    pretrained_model_name_or_path: str | None = None,
    unet_config: dict[str, Any] | None = None,
    subfolder: str = "unet",
    seed: int = 0,
    option: str = "model.pretrained_model_name_or_path",
) -> UNet2DConditionModel:
    """Load the U-Net from a diffusers directory or hub id, or build it from a config.

    Args:
        pretrained_model_name_or_path: a Stable Diffusion directory or hub id; wins over
            ``unet_config`` when both are given.
        unet_config: keyword arguments of ``UNet2DConditionModel`` for a randomly initialised one.
        subfolder: the U-Net's folder inside the pipeline directory.
        seed: the seed of the random initialisation of a U-Net built from ``unet_config``.
        option: the config key named in error messages.

    Raises:
        ValueError: when neither source is given.
        MissingWeightsError: when the directory or hub id cannot be loaded.
    """
    if pretrained_model_name_or_path:
        _check_path(pretrained_model_name_or_path, option)
        try:
            return UNet2DConditionModel.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder or None)
        except (OSError, ValueError) as error:
            raise _describe_missing(pretrained_model_name_or_path, subfolder, option, error) from error
    if unet_config is None:
        raise ValueError("Set model.pretrained_model_name_or_path or model.unet_config to build the U-Net.")

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config)
    torch.random.set_rng_state(generator_state)
    return unet


def load_vae(pretrained_model_name_or_path: str, subfolder: str = "vae") -> AutoencoderKL:
    """Load the frozen VAE from a diffusers directory or hub id.

    Raises:
        MissingWeightsError: when the directory or hub id cannot be loaded.
    """
    _check_path(pretrained_model_name_or_path, "model.pretrained_model_name_or_path")
    try:
        vae = AutoencoderKL.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder)
    except (OSError, ValueError) as error:
        raise _describe_missing(pretrained_model_name_or_path, subfolder, "model.pretrained_model_name_or_path", error) from error
    vae.requires_grad_(False)
    vae.eval()
    return vae


def load_noise_scheduler(
    pretrained_model_name_or_path: str | None = None, scheduler_config: dict[str, Any] | None = None
) -> DDPMScheduler:
    """Load the training DDPM scheduler of the base model, or build it from a config.

    Without either source, Stable Diffusion 1.5's schedule is used (1000 steps, scaled-linear
    betas from 0.00085 to 0.012, epsilon prediction).
    """
    if pretrained_model_name_or_path:
        try:
            return DDPMScheduler.from_pretrained(pretrained_model_name_or_path, subfolder="scheduler")
        except (OSError, ValueError) as error:
            raise _describe_missing(pretrained_model_name_or_path, "scheduler", "model.pretrained_model_name_or_path", error) from error
    return DDPMScheduler(**(scheduler_config or SD15_SCHEDULER_CONFIG))


class IdentityLatent(nn.Module):
    """A stand-in for the VAE that uses the image itself as the latent.

    The demo trains on small phantoms. An untrained VAE would give meaningless latents, and SD's
    8x downsampling would leave maps of a few pixels, so the demo diffuses the ``[-1, 1]`` image
    directly with a scaling factor of 1.
    """

    scaling_factor = 1.0

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return pixel_values


@torch.no_grad()
def encode_images(vae: AutoencoderKL | IdentityLatent, pixel_values: torch.Tensor, sample: bool = False) -> torch.Tensor:
    """Encode ``[B, 3, H, W]`` images in ``[-1, 1]`` to scaled latents.

    Args:
        vae: the frozen VAE or the identity latent.
        pixel_values: the images.
        sample: draw from the posterior instead of taking its mean.

    Returns:
        ``[B, 4, H/8, W/8]`` latents times the VAE's scaling factor (the image itself for the
        identity latent).
    """
    if isinstance(vae, IdentityLatent):
        return pixel_values
    posterior = vae.encode(pixel_values.to(vae.dtype)).latent_dist
    latents = posterior.sample() if sample else posterior.mean
    return latents * vae.config.scaling_factor
