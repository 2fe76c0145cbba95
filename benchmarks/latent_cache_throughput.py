"""Training-step throughput with and without the latent cache, from one run.

Both runs train the same small U-Net on the same JPEG files for the same number of steps:

- `pixels`: the data loader decodes, resizes and crops each image, and every step encodes the
  batch with the frozen VAE before the U-Net step;
- `cache`: the images are encoded once into a `datamodules.latent_cache.LatentCache` (its build
  time is reported apart), and every step reads the stored posterior and samples from it.

Text conditioning is a fixed random tensor, so the difference is the data and VAE path alone.
The last output line is ``cache_over_pixels=<steps per second with cache / without>``.

Usage, from the repository root::

    python -m benchmarks.latent_cache_throughput                 # small VAE and U-Net, CPU-sized
    python -m benchmarks.latent_cache_throughput --sd15-vae      # SD 1.5-shaped VAE at 512 px (GPU)
"""

import argparse
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image
from torch.utils.data import DataLoader

from datamodules.datamodule import collate_training
from datamodules.image_io import DecodeMode
from datamodules.latent_cache import (
    LatentCache,
    LatentCacheKey,
    LatentCaptionDataset,
    LatentDtype,
    encode_posterior,
    image_list_digest,
    latent_shape,
    vae_digest,
)
from datamodules.mimic_cxr import CaptionImageDataset

logger = logging.getLogger(__name__)

SMALL_VAE_CONFIG = {
    "block_out_channels": (32, 64, 64, 64),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 16,
}
# The encoder shape of Stable Diffusion 1.5's VAE (random weights; throughput does not depend on them).
SD15_VAE_CONFIG = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
}
UNET_CONFIG = {
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}
SCALING_FACTOR = 0.18215
NUM_TOKENS = 77


@dataclass
class RunResult:
    """Throughput of one data path.

    Attributes:
        mode: ``pixels`` or ``cache``.
        steps: Timed training steps (after the warm-up steps).
        seconds: Wall time of the timed steps.
        steps_per_second: ``steps / seconds``.
        images_per_second: Training images per second.
    """

    mode: str
    steps: int
    seconds: float
    steps_per_second: float
    images_per_second: float


def write_images(folder: Path, count: int, size: tuple[int, int]) -> list[str]:
    """Write `count` random 8-bit grayscale JPEGs of ``size`` (height, width)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        pixels = rng.integers(0, 255, size, dtype=np.uint8)
        path = folder / f"{index:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(str(path))
    return paths


def train_steps(
    loader: DataLoader,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    steps: int,
    warmup: int,
    device: torch.device,
) -> tuple[int, float]:
    """Run `warmup` + `steps` training steps, cycling the loader; return timed steps and seconds."""
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    generator = torch.Generator(device=device).manual_seed(0)
    done = 0
    start = 0.0

    while done < warmup + steps:
        for batch in loader:
            if done == warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()

            # Latents: encode the images every step, or sample the stored posterior.
            if "latent_mean" in batch:
                mean = batch["latent_mean"].to(device, non_blocking=True)
                std = torch.exp(0.5 * batch["latent_logvar"].to(device, non_blocking=True))
                latents = mean + std * torch.randn(mean.shape, generator=generator, device=device)
            else:
                posterior = vae.encode(batch["pixel_values"].to(device, non_blocking=True)).latent_dist
                latents = posterior.sample(generator=generator)
            latents = latents * SCALING_FACTOR

            # Noise, timesteps and the U-Net step.
            noise = torch.randn(latents.shape, generator=generator, device=device)
            timesteps = torch.randint(0, 1000, (latents.shape[0],), generator=generator, device=device)
            noisy_latents = latents + noise * (timesteps.float() / 1000.0).view(-1, 1, 1, 1)
            encoder_hidden_states = torch.zeros(latents.shape[0], NUM_TOKENS, UNET_CONFIG["cross_attention_dim"], device=device)
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
            loss = F.mse_loss(model_pred, noise)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            done += 1
            if done == warmup + steps:
                break

    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps, time.perf_counter() - start


def main() -> None:
    """Parse options, run both data paths and print one JSON line per run and the ratio."""
    parser = argparse.ArgumentParser(description="Training-step throughput with and without the latent cache.")
    parser.add_argument("--images", type=int, default=64, help="JPEG files written for the run.")
    parser.add_argument("--source-size", type=int, default=1024, help="Side of the written JPEGs in pixels.")
    parser.add_argument("--image-size", type=int, default=256, help="Model input side S in pixels.")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="Timed training steps per run.")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed steps before timing starts.")
    parser.add_argument("--num-workers", type=int, default=2, help="Data loader worker processes.")
    parser.add_argument("--sd15-vae", action="store_true", help="Use an encoder shaped like SD 1.5's VAE and S=512.")
    parser.add_argument("--work-dir", type=str, default=None, help="Folder for images and cache (a temporary one by default).")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    image_size = 512 if arguments.sd15_vae else arguments.image_size
    torch.manual_seed(0)
    vae = AutoencoderKL(**(SD15_VAE_CONFIG if arguments.sd15_vae else SMALL_VAE_CONFIG)).to(device).eval().requires_grad_(False)
    unet = UNet2DConditionModel(sample_size=image_size // 8, **UNET_CONFIG).to(device).train()

    with tempfile.TemporaryDirectory() as temporary:
        work_dir = Path(arguments.work_dir or temporary)
        paths = write_images(work_dir / "images", arguments.images, (arguments.source_size, arguments.source_size))
        captions = ["caption"] * len(paths)
        images = CaptionImageDataset(paths, captions, image_size, DecodeMode.STRICT)
        loader_options = {
            "batch_size": arguments.batch_size,
            "shuffle": True,
            "num_workers": arguments.num_workers,
            "pin_memory": device.type == "cuda",
            "persistent_workers": arguments.num_workers > 0,
            "drop_last": True,
            "collate_fn": partial(collate_training, image_size=image_size),
        }

        # Without the cache: decode and encode every step.
        steps, seconds = train_steps(DataLoader(images, **loader_options), unet, vae, arguments.steps, arguments.warmup, device)
        pixels = RunResult("pixels", steps, seconds, steps / seconds, steps * arguments.batch_size / seconds)
        print(json.dumps(asdict(pixels)))

        # With the cache: one build (timed apart), then train from the stored posteriors.
        key = LatentCacheKey(image_list_digest(paths), vae_digest(vae), image_size, fast_jpeg=True, dtype=LatentDtype.FLOAT16)
        cache = LatentCache(work_dir / "cache", key, len(paths), latent_shape(vae, image_size))
        build_start = time.perf_counter()
        cache.build(images, partial(encode_posterior, vae), batch_size=arguments.batch_size, num_workers=arguments.num_workers)
        build_seconds = time.perf_counter() - build_start
        latents = LatentCaptionDataset(cache.directory, LatentDtype.FLOAT16, cache.usable_indices(), captions)
        steps, seconds = train_steps(DataLoader(latents, **loader_options), unet, vae, arguments.steps, arguments.warmup, device)
        cached = RunResult("cache", steps, seconds, steps / seconds, steps * arguments.batch_size / seconds)
        print(json.dumps({**asdict(cached), "cache_build_seconds": build_seconds}))

    print(json.dumps({"device": str(device), "image_size": image_size, "source_size": arguments.source_size, "batch_size": arguments.batch_size}))
    print(f"cache_over_pixels={cached.steps_per_second / pixels.steps_per_second:.2f}")


if __name__ == "__main__":
    main()
