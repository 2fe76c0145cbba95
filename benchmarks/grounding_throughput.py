"""Throughput and peak memory of the grounding engine in `gt_cfg` mode.

Three approaches produce the same `P_comb` for a batch of pairs:

- `engine`: `grounding.engine.GroundingEngine`, with batched timesteps, no unconditional
  branch, only the window's steps and maps summed on the device;
- `bare`: only the U-Net forward passes that the engine issues, with prepared inputs and no
  capture (the lower bound);
- `reference`: the straightforward approach. It runs all T steps one at a time with the CFG
  batch `[uncond, cond]`. Every head-averaged map is upsampled to the latent grid and copied to
  the CPU at every step and layer, and the maps are reduced at the end.

Times are the fastest of `--repeats` runs, taken in rounds over all approaches. Peak memory is
the increase above the level before the measured run: on CUDA from
`torch.cuda.max_memory_allocated`, on the CPU from the maximum resident set size
(`resource.getrusage(...).ru_maxrss`) of a fresh subprocess per measurement, with glibc's
`MALLOC_MMAP_THRESHOLD_` fixed so that freed tensors leave the resident set. The last output line
is `engine_over_bare=<x> reference_over_engine=<y> peak_memory_T50_over_T5=<z>`.

Usage, from the repository root::

    python -m benchmarks.grounding_throughput            # demo-sized U-Net on the CPU
    python -m benchmarks.grounding_throughput --sd15     # SD 1.5-sized U-Net, random weights (GPU)
"""

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from enum import Enum, unique
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DConditionModel

from grounding.capture import list_cross_attention_layers
from grounding.engine import GroundingConfig, GroundingEngine, NoiseStream, draw_noise
from grounding.maps import combined_map

logger = logging.getLogger(__name__)

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
NUM_TOKENS = 77
TOKENS = [1, 2, 3]

# The U-Net of configs/demo.yaml (64 px there, 32 px by default here): the image is the latent.
DEMO_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3,
    "up_block_types": ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 64,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}
# Stable Diffusion 1.5: the diffusers defaults with a 64x64 latent and 768-d text features.
# NOTE: --sd15 has run only on the CPU at T = 10 (docs/benchmarks.md), never on a GPU.
SD15_UNET_CONFIG = {"sample_size": 64, "cross_attention_dim": 768}
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


@unique
class Approach(str, Enum):
    """Way of producing the maps that one measurement times."""

    ENGINE = "engine"
    BARE = "bare"
    REFERENCE = "reference"


@dataclass
class Measurement:
    """Result of one measurement."""

    approach: str
    num_steps: int
    seconds_per_pair: float
    peak_memory_bytes: int
    memory_source: str


def _build(args: argparse.Namespace) -> tuple[UNet2DConditionModel, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    config = SD15_UNET_CONFIG if args.sd15 else DEMO_UNET_CONFIG
    config = {**config, "sample_size": args.latent_size or config["sample_size"]}
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    unet = UNet2DConditionModel(**config).to(args.device).eval()
    if dtype != torch.float32:
        unet = unet.to(dtype)

    generator = torch.Generator().manual_seed(1)
    side = unet.config.sample_size
    width = unet.config.cross_attention_dim
    inputs = {
        "latents": torch.randn(args.pairs, unet.config.in_channels, side, side, generator=generator),
        "cond": torch.randn(args.pairs, NUM_TOKENS, width, generator=generator),
        "uncond": torch.randn(1, NUM_TOKENS, width, generator=generator),
    }
    return unet, {name: tensor.to(args.device) for name, tensor in inputs.items()}


def _engine_config(args: argparse.Namespace, num_steps: int) -> GroundingConfig:
    window = round(num_steps * args.window_fraction)
    return GroundingConfig(
        num_inference_steps=num_steps, timestep_window=window, steps_per_forward=args.steps_per_forward
    )


def _run_engine(unet: UNet2DConditionModel, inputs: dict[str, torch.Tensor], config: GroundingConfig) -> None:
    engine = GroundingEngine(unet, SCHEDULER_CONFIG, config)
    pair_seeds = list(range(inputs["latents"].shape[0]))
    summaries = engine.run(inputs["latents"], inputs["cond"], inputs["uncond"], None, pair_seeds)
    for summary in summaries:
        combined_map(summary, TOKENS)


def _prepare_bare(
    unet: UNet2DConditionModel, inputs: dict[str, torch.Tensor], config: GroundingConfig
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Build the engine's forward inputs (noised latents, timesteps, text) for every chunk."""
    scheduler = DDIMScheduler.from_config(SCHEDULER_CONFIG)
    scheduler.set_timesteps(config.num_inference_steps, device=unet.device)
    latents = inputs["latents"]
    num_pairs = latents.shape[0]
    steps = list(range(config.num_inference_steps - config.timestep_window, config.num_inference_steps))

    forwards = []
    for start in range(0, len(steps), config.steps_per_forward):
        chunk = steps[start : start + config.steps_per_forward]
        noise = torch.stack(
            [draw_noise(0, pair, NoiseStream.STEP, step, latents.shape[1:]) for step in chunk for pair in range(num_pairs)]
        ).to(unet.device)
        timesteps = scheduler.timesteps[chunk].repeat_interleave(num_pairs)
        noisy = scheduler.add_noise(latents.repeat(len(chunk), 1, 1, 1), noise, timesteps).to(unet.dtype)
        forwards.append((noisy, timesteps, inputs["cond"].repeat(len(chunk), 1, 1).to(unet.dtype)))
    return forwards


def _run_bare(unet: UNet2DConditionModel, forwards: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    for noisy, timesteps, states in forwards:
        unet(noisy, timesteps, states)


class _CopyEveryMap:
    """Processor of the straightforward approach: default output, every map copied to the CPU."""

    def __init__(self, original: object, maps: list[torch.Tensor], latent_size: tuple[int, int]) -> None:
        self.original = original
        self.maps = maps
        self.latent_size = latent_size
        self.rows = slice(None)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):  # noqa: ANN001, ANN204
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        head_dim = query.shape[-1] // attn.heads
        query = query.unflatten(-1, (attn.heads, head_dim)).transpose(1, 2)
        key = key.unflatten(-1, (attn.heads, head_dim)).transpose(1, 2)
        probs = (query @ key.transpose(-1, -2) * head_dim**-0.5).softmax(-1).mean(1)[self.rows]
        side = int(probs.shape[1] ** 0.5)
        layer_maps = probs.transpose(1, 2).unflatten(-1, (side, side)).float()
        self.maps.append(F.interpolate(layer_maps, size=self.latent_size, mode="nearest").cpu())
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask)


def _run_reference(unet: UNet2DConditionModel, inputs: dict[str, torch.Tensor], config: GroundingConfig) -> None:
    scheduler = DDIMScheduler.from_config(SCHEDULER_CONFIG)
    scheduler.set_timesteps(config.num_inference_steps, device=unet.device)
    latents = inputs["latents"]
    num_pairs = latents.shape[0]
    states = torch.cat([inputs["uncond"].expand(num_pairs, -1, -1), inputs["cond"]]).to(unet.dtype)
    modules = dict(unet.named_modules())
    names = list_cross_attention_layers(unet)
    originals = {name: modules[name].processor for name in names}
    maps: list[torch.Tensor] = []

    try:
        for name in names:
            processor = _CopyEveryMap(originals[name], maps, tuple(latents.shape[-2:]))
            processor.rows = slice(num_pairs, 2 * num_pairs)
            modules[name].set_processor(processor)
        for step, timestep in enumerate(scheduler.timesteps):
            noise = torch.stack(
                [draw_noise(0, pair, NoiseStream.STEP, step, latents.shape[1:]) for pair in range(num_pairs)]
            ).to(unet.device)
            noisy = scheduler.add_noise(latents, noise, timestep.expand(num_pairs)).to(unet.dtype)
            unet(torch.cat([noisy, noisy]), timestep.expand(2 * num_pairs), states)
    finally:
        for name in names:
            modules[name].set_processor(originals[name])

    # [T * L, P, N, h, w] -> [T, L, P, N, h, w], then P_comb per pair from the window's steps.
    all_maps = torch.stack(maps).unflatten(0, (config.num_inference_steps, len(names)))
    window = all_maps[config.num_inference_steps - config.timestep_window :]
    for pair in range(num_pairs):
        mean_map = window[:, :, pair, TOKENS].mean((0, 1, 2))
        (mean_map - mean_map.min()) / (mean_map.max() - mean_map.min())


def _current_rss_peak() -> int:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Bench:
    """The U-Net, inputs and prepared forwards of one benchmark process."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.unet, self.inputs = _build(args)
        self.bare_forwards = {
            num_steps: _prepare_bare(self.unet, self.inputs, _engine_config(args, num_steps))
            for num_steps in (args.steps, args.short_steps)
        }

        # A one-row forward loads kernels and fills allocator pools before anything is measured.
        with torch.no_grad():
            self.unet(
                self.inputs["latents"][:1].to(self.unet.dtype),
                torch.tensor([1], device=self.unet.device),
                self.inputs["cond"][:1].to(self.unet.dtype),
            )
        self._synchronize()

    def _synchronize(self) -> None:
        if self.unet.device.type == "cuda":
            torch.cuda.synchronize()

    def run(self, approach: Approach, num_steps: int) -> float:
        """Run one approach once and return its wall-clock seconds."""
        config = _engine_config(self.args, num_steps)
        start = time.perf_counter()
        with torch.no_grad():
            if approach == Approach.ENGINE:
                _run_engine(self.unet, self.inputs, config)
            elif approach == Approach.BARE:
                _run_bare(self.unet, self.bare_forwards[num_steps])
            else:
                _run_reference(self.unet, self.inputs, config)
        self._synchronize()
        return time.perf_counter() - start

    def peak_memory(self, approach: Approach, num_steps: int) -> tuple[int, str]:
        """Run one approach once and return its peak memory above the level before it."""
        if self.unet.device.type == "cuda":
            baseline = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            self.run(approach, num_steps)
            return torch.cuda.max_memory_allocated() - baseline, "torch.cuda.max_memory_allocated"
        baseline = _current_rss_peak()
        self.run(approach, num_steps)
        return max(_current_rss_peak() - baseline, 0), "ru_maxrss of a fresh subprocess"


def _peak_memory_in_subprocess(approach: Approach, num_steps: int) -> tuple[int, str]:
    command = [sys.executable, "-m", "benchmarks.grounding_throughput", *sys.argv[1:]]
    command += ["--memory-worker", approach.value, "--worker-steps", str(num_steps)]
    # A fixed mmap threshold makes glibc return large freed blocks to the system at once, so the
    # resident set follows the live tensors instead of the allocator's cached heap.
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run(
        command, cwd=REPOSITORY_ROOT, env=environment, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"Memory measurement of {approach.value} at T={num_steps} failed:\n{result.stderr[-4000:]}")
    peak, source = json.loads(result.stdout.strip().splitlines()[-1])
    return peak, source


def measure(args: argparse.Namespace) -> list[Measurement]:
    """Time every approach and take its peak memory.

    The timed runs alternate between the approaches for `args.repeats` rounds, and the fastest
    run of each counts, so that other processes on shared cores disturb all approaches alike.
    Peak memory comes from one more run each, in a fresh subprocess on the CPU.
    """
    plan = [
        (Approach.ENGINE, args.steps),
        (Approach.BARE, args.steps),
        (Approach.REFERENCE, args.steps),
        (Approach.ENGINE, args.short_steps),
    ]
    # Memory first: a child process inherits its parent's ru_maxrss on Linux, so the subprocesses
    # must start while this process is still small.
    peaks = {}
    for approach, num_steps in plan:
        if args.device == "cpu":
            logger.info("Peak memory of %s at T=%d", approach.value, num_steps)
            peaks[(approach, num_steps)] = _peak_memory_in_subprocess(approach, num_steps)

    bench = _Bench(args)
    seconds: dict[tuple[Approach, int], list[float]] = {entry: [] for entry in plan}
    for round_index in range(args.repeats):
        for approach, num_steps in plan:
            logger.info("Round %d: timing %s at T=%d", round_index + 1, approach.value, num_steps)
            seconds[(approach, num_steps)].append(bench.run(approach, num_steps))

    measurements = []
    for approach, num_steps in plan:
        if args.device != "cpu":
            logger.info("Peak memory of %s at T=%d", approach.value, num_steps)
            peaks[(approach, num_steps)] = bench.peak_memory(approach, num_steps)
        peak, source = peaks[(approach, num_steps)]
        fastest = min(seconds[(approach, num_steps)]) / args.pairs
        measurements.append(Measurement(approach.value, num_steps, fastest, peak, source))
    return measurements


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sd15", action="store_true", help="Use an SD 1.5-sized U-Net with random weights.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Torch device.")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="U-Net dtype.")
    parser.add_argument(
        "--latent-size", type=int, default=None, help="Latent side in pixels (default: 32 for the demo U-Net, 64 with --sd15)."
    )
    parser.add_argument("--cpu-threads", type=int, default=None, help="torch.set_num_threads for CPU runs (default: torch's).")
    parser.add_argument("--pairs", type=int, default=2, help="Pairs per batch.")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps T of the main measurement.")
    parser.add_argument("--short-steps", type=int, default=5, help="T of the memory comparison run.")
    parser.add_argument(
        "--window-fraction", type=float, default=0.8, help="Window n as a fraction of T (40 of 50 by default)."
    )
    parser.add_argument("--steps-per-forward", type=int, default=4, help="Timesteps per batched forward of the engine.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed rounds over all approaches; the fastest run counts.")
    parser.add_argument("--memory-worker", choices=[approach.value for approach in Approach], help=argparse.SUPPRESS)
    parser.add_argument("--worker-steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.latent_size is None and not args.sd15:
        args.latent_size = 32
    if args.latent_size is not None and args.latent_size < 8:
        parser.error(f"--latent-size must be >= 8, got {args.latent_size}.")
    if args.pairs < 1 or args.repeats < 1 or args.steps < 1 or args.short_steps < 1:
        parser.error("--pairs, --repeats, --steps and --short-steps must be >= 1.")
    if not 0 < args.window_fraction <= 1:
        parser.error(f"--window-fraction must lie in (0, 1], got {args.window_fraction}.")
    if min(args.steps, args.short_steps) * args.window_fraction < args.steps_per_forward:
        parser.error("--steps-per-forward must not exceed the window of the short run, or the forward sizes differ.")
    return args


def main() -> None:
    """Run every measurement and print the table and the ratio line."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = _parse_args()
    if args.cpu_threads is not None:
        torch.set_num_threads(args.cpu_threads)
    if args.memory_worker:
        bench = _Bench(args)
        print(json.dumps(bench.peak_memory(Approach(args.memory_worker), args.worker_steps)))
        return

    results = measure(args)
    engine, bare, reference, engine_short = results
    for result in results:
        print(
            f"{result.approach:>9} T={result.num_steps:<3} {result.seconds_per_pair:8.3f} s/pair "
            f"peak {result.peak_memory_bytes / 2**20:9.1f} MiB ({result.memory_source})"
        )
    print(
        f"engine_over_bare={engine.seconds_per_pair / bare.seconds_per_pair:.3f} "
        f"reference_over_engine={reference.seconds_per_pair / engine.seconds_per_pair:.3f} "
        f"peak_memory_T{args.steps}_over_T{args.short_steps}="
        f"{engine.peak_memory_bytes / max(engine_short.peak_memory_bytes, 1):.3f}"
    )


if __name__ == "__main__":
    main()
