"""Sampling modes that produce the cross-attention maps used for phrase grounding.

`GroundingEngine` runs DDIM sampling (`diffusers.DDIMScheduler`, built from the training
scheduler's config, eta 0) with the capture processors of `grounding.capture` installed, and sums
the maps with `grounding.maps.StreamingAttentionAccumulator`. Modes (`SamplingMode`):

- `text_only`: sampling from Gaussian noise without guidance;
- `cfg`: sampling from Gaussian noise with classifier-free guidance;
- `gt1_cfg`: the ground-truth latent noised to the first timestep, then guided sampling;
- `gt_cfg` (the main mode): at every timestep t the U-Net input is the ground-truth latent
  freshly noised to t with new noise. The prediction is never fed forward, so the steps are
  independent and run as batched forwards of several timesteps at once. The unconditional branch
  is skipped: it only mixes into the noise prediction, which nothing uses, and the rows of a
  batch do not interact in the U-Net, so it cannot change the conditional attention. Steps
  outside every timestep window are skipped too.

With `bimodal_bias_merging`, a second run samples from Gaussian noise with guidance and the same
text (the text bias), in step with the main run, and the accumulator also sums
`P_img[t, l] @ mean_k P_txt[t, l, k]` for each token selection given to `run`.

Every pair's noise comes from `(config.seed, pair_seed, stream, step)` only, so a pair's maps do
not depend on the other pairs of its batch or on the chunking.

Usage::

    engine = GroundingEngine(unet, noise_scheduler.config, GroundingConfig())
    summaries = engine.run(latents, encoder_hidden_states, uncond_hidden_states,
                           token_sets=None, pair_seeds=[pair_seed_from_id(i) for i in pair_ids])
    p_comb = grounding.maps.combined_map(summaries[0], tokens=[1, 2])
"""

import hashlib
import logging
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum, unique
from typing import Any, TypeVar

import numpy as np
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from grounding.capture import capture_cross_attention, resolve_cross_attention_layers
from grounding.maps import AttentionSummary, CaptureBlock, CapturePass, StreamingAttentionAccumulator

logger = logging.getLogger(__name__)

EnumType = TypeVar("EnumType", bound=Enum)


def parse_choice(kind: type[EnumType], value: Any, option: str) -> EnumType:
    """Convert ``value`` to a member of the enum ``kind``.

    Raises:
        ValueError: If no member has that value. The message names the option and the allowed values.
    """
    try:
        return kind(value)
    except ValueError:
        allowed = [member.value for member in kind]
        raise ValueError(f"Invalid {option} {value!r}. Allowed: {allowed}.") from None


@unique
class SamplingMode(str, Enum):
    """Way the U-Net inputs of the grounding run are produced."""

    TEXT_ONLY = "text_only"
    CFG = "cfg"
    GT1_CFG = "gt1_cfg"
    GT_CFG = "gt_cfg"


@unique
class NoiseStream(int, Enum):
    """Independent noise sources of one pair."""

    GAUSSIAN_START = 1
    FIRST_STEP = 2
    STEP = 3
    TEXT_RUN_START = 4


@dataclass
class GroundingConfig:
    """Settings of the grounding run.

    Attributes:
        mode: The sampling mode.
        num_inference_steps: Number of DDIM steps T.
        guidance_scale: Classifier-free guidance scale of the guided modes and the text run.
        timestep_window: The main window n: the last n of the T steps are averaged.
        extra_timestep_windows: More window sizes to accumulate in the same pass, for comparison.
        layers: Captured `attn2` layers by name or forward-order index; `None` is all of them.
        seed: Seed mixed into every pair's noise.
        steps_per_forward: Timesteps per batched forward in `gt_cfg` mode.
        pairs_per_forward: Pairs per batch; `None` runs all pairs of a `run` call together.
        bimodal_bias_merging: Also run the text-bias sampling of Bimodal Bias Merging.
    """

    mode: SamplingMode = SamplingMode.GT_CFG
    num_inference_steps: int = 50
    guidance_scale: float = 16.0
    timestep_window: int = 40
    extra_timestep_windows: list[int] = field(default_factory=list)
    layers: list[str | int] | None = None
    seed: int = 0
    steps_per_forward: int = 10
    pairs_per_forward: int | None = None
    bimodal_bias_merging: bool = False

    def __post_init__(self) -> None:
        self.mode = parse_choice(SamplingMode, self.mode, "sampling mode")
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}.")
        for window in [self.timestep_window, *self.extra_timestep_windows]:
            if not 1 <= window <= self.num_inference_steps:
                raise ValueError(
                    f"Timestep window {window} must lie in [1, num_inference_steps="
                    f"{self.num_inference_steps}]."
                )
        if self.steps_per_forward < 1:
            raise ValueError(f"steps_per_forward must be >= 1, got {self.steps_per_forward}.")
        if self.pairs_per_forward is not None and self.pairs_per_forward < 1:
            raise ValueError(f"pairs_per_forward must be >= 1 or None, got {self.pairs_per_forward}.")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}.")

    @property
    def timestep_windows(self) -> tuple[int, ...]:
        """All accumulated window sizes, ascending and without duplicates."""
        return tuple(sorted({self.timestep_window, *self.extra_timestep_windows}))


def pair_seed_from_id(pair_id: str) -> int:
    """Derive a stable non-negative 63-bit seed from a pair id (independent of PYTHONHASHSEED)."""
    digest = hashlib.sha256(pair_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def draw_noise(
    seed: int,
    pair_seed: int,
    stream: NoiseStream,
    step_index: int,
    shape: Sequence[int],
) -> torch.Tensor:
    """Draw standard Gaussian noise determined by its seeds, stream and step.

    The noise is drawn on the CPU, so it is the same on every device.

    Returns:
        float32 CPU tensor of `shape`.
    """
    entropy = [seed, pair_seed, int(stream), step_index]
    generator_seed = int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]) >> 1
    generator = torch.Generator().manual_seed(generator_seed)
    return torch.randn(*shape, generator=generator)


@dataclass
class _Trajectory:
    """A sequentially denoised batch of latents: one row per pair, float32."""

    capture_pass: CapturePass
    latents: torch.Tensor
    cond_states: torch.Tensor
    uncond_states: torch.Tensor | None

    @property
    def num_rows(self) -> int:
        factor = 1 if self.uncond_states is None else 2
        return factor * self.latents.shape[0]


class GroundingEngine:
    """Runner of a sampling mode with attention capture and streaming accumulation.

    Args:
        unet: The U-Net (EMA weights for evaluation). It runs in its own dtype, in eval mode and
            without gradients; its training mode is restored afterwards.
        scheduler_config: Config of the training noise scheduler (for example
            `noise_scheduler.config`); the DDIM scheduler is built from it.
        config: The grounding settings.

    Raises:
        ValueError: If a configured layer does not exist.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        scheduler_config: Mapping[str, object],
        config: GroundingConfig | None = None,
    ) -> None:
        self.unet = unet
        self.config = config or GroundingConfig()
        # Stable Diffusion 1.5 samples with set_alpha_to_one=False; a DDPM training config does not
        # carry that key, so it is set here unless the given config has it.
        self.scheduler = DDIMScheduler.from_config({"set_alpha_to_one": False, **dict(scheduler_config)})
        self.layer_names = resolve_cross_attention_layers(unet, self.config.layers)

    def run(
        self,
        latents: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        uncond_hidden_states: torch.Tensor | None,
        token_sets: Sequence[dict[str, list[int]]] | None,
        pair_seeds: Sequence[int],
    ) -> list[AttentionSummary]:
        """Sample with capture and return one attention summary per pair.

        Args:
            latents: `[B, C, h, w]` ground-truth latents (scaled like the training latents). The
                Gaussian modes use only their shape.
            encoder_hidden_states: `[B, N, D]` text encodings of the phrases.
            uncond_hidden_states: `[1, N, D]` encoding of the empty caption. Required by `cfg`,
                `gt1_cfg` and Bimodal Bias Merging, unused otherwise.
            token_sets: Per pair, token-selection name -> token positions, for the product sums
                of Bimodal Bias Merging. Every pair needs the same names; an empty position list
                is allowed and makes that selection's maps fail at reduction. Unused without it.
            pair_seeds: One non-negative seed per pair (for example `pair_seed_from_id`).

        Returns:
            One `AttentionSummary` per pair, tensors on the U-Net's device.

        Raises:
            ValueError: If shapes, seeds or token sets are inconsistent or missing.
            CaptureError: If a configured layer was not captured (a RuntimeError).
        """
        self._check_inputs(latents, encoder_hidden_states, uncond_hidden_states, token_sets, pair_seeds)
        device = self.unet.device
        latents = latents.to(device, torch.float32)
        encoder_hidden_states = encoder_hidden_states.to(device, self.unet.dtype)
        if uncond_hidden_states is not None:
            uncond_hidden_states = uncond_hidden_states.to(device, self.unet.dtype)
        self.scheduler.set_timesteps(self.config.num_inference_steps, device=device)

        group_size = self.config.pairs_per_forward or latents.shape[0]
        was_training = self.unet.training
        self.unet.eval()
        summaries = []
        try:
            with torch.no_grad():
                for start in range(0, latents.shape[0], group_size):
                    group = slice(start, start + group_size)
                    summaries += self._run_group(
                        latents[group],
                        encoder_hidden_states[group],
                        uncond_hidden_states,
                        None if token_sets is None else token_sets[group],
                        list(pair_seeds[group]),
                    )
        finally:
            self.unet.train(was_training)
        return summaries

    def _check_inputs(
        self,
        latents: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        uncond_hidden_states: torch.Tensor | None,
        token_sets: Sequence[dict[str, list[int]]] | None,
        pair_seeds: Sequence[int],
    ) -> None:
        if latents.ndim != 4:
            raise ValueError(f"latents must be [B, C, h, w], got shape {tuple(latents.shape)}.")
        num_pairs = latents.shape[0]
        if latents.shape[1] != self.unet.config.in_channels:
            raise ValueError(
                f"latents have {latents.shape[1]} channels but the U-Net takes "
                f"{self.unet.config.in_channels}."
            )
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != num_pairs:
            raise ValueError(
                f"encoder_hidden_states must be [B={num_pairs}, N, D], got shape "
                f"{tuple(encoder_hidden_states.shape)}."
            )
        if len(pair_seeds) != num_pairs:
            raise ValueError(f"Expected {num_pairs} pair seeds, got {len(pair_seeds)}.")
        for pair_seed in pair_seeds:
            if isinstance(pair_seed, bool) or not isinstance(pair_seed, int) or pair_seed < 0:
                raise ValueError(f"Invalid pair seed {pair_seed!r}: expected an int >= 0.")

        needs_uncond = self.config.mode in (SamplingMode.CFG, SamplingMode.GT1_CFG)
        if needs_uncond or self.config.bimodal_bias_merging:
            expected_shape = (1, *encoder_hidden_states.shape[1:])
            if uncond_hidden_states is None:
                raise ValueError(
                    f"Mode {self.config.mode.value} (bimodal_bias_merging="
                    f"{self.config.bimodal_bias_merging}) needs uncond_hidden_states, the "
                    "encoding of the empty caption."
                )
            if tuple(uncond_hidden_states.shape) != expected_shape:
                raise ValueError(
                    f"uncond_hidden_states must have shape {expected_shape}, got "
                    f"{tuple(uncond_hidden_states.shape)}."
                )

        if self.config.bimodal_bias_merging:
            self._check_token_sets(token_sets, num_pairs, encoder_hidden_states.shape[1])

    def _check_token_sets(
        self, token_sets: Sequence[dict[str, list[int]]] | None, num_pairs: int, num_tokens: int
    ) -> None:
        if token_sets is None or len(token_sets) != num_pairs:
            given = None if token_sets is None else len(token_sets)
            raise ValueError(
                f"Bimodal Bias Merging needs one token-set dict per pair ({num_pairs}), got {given}."
            )
        names = list(token_sets[0])
        if not names:
            raise ValueError("Bimodal Bias Merging needs at least one named token selection.")
        for pair, selections in enumerate(token_sets):
            if sorted(selections) != sorted(names):
                raise ValueError(
                    f"Pair {pair} has token selections {sorted(selections)}, expected {sorted(names)}."
                )
            for name, positions in selections.items():
                if not positions:
                    logger.warning("Pair %d has an empty token selection %r.", pair, name)
                for position in positions:
                    if isinstance(position, bool) or not isinstance(position, numbers.Integral):
                        raise ValueError(f"Pair {pair}, selection {name!r}: invalid position {position!r}.")
                    if not 0 <= position < num_tokens:
                        raise ValueError(
                            f"Pair {pair}, selection {name!r}: position {position} is outside "
                            f"[0, {num_tokens})."
                        )

    def _run_group(
        self,
        latents: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        uncond_hidden_states: torch.Tensor | None,
        token_sets: Sequence[dict[str, list[int]]] | None,
        pair_seeds: list[int],
    ) -> list[AttentionSummary]:
        num_pairs = latents.shape[0]
        accumulator = StreamingAttentionAccumulator(
            self.layer_names,
            num_pairs=num_pairs,
            latent_size=tuple(latents.shape[-2:]),
            num_inference_steps=self.config.num_inference_steps,
            timestep_windows=self.config.timestep_windows,
            main_window=self.config.timestep_window,
            pair_seeds=pair_seeds,
            token_sets=token_sets if self.config.bimodal_bias_merging else None,
        )
        uncond_states = None
        if uncond_hidden_states is not None:
            uncond_states = uncond_hidden_states.expand(num_pairs, -1, -1)

        text_run = None
        if self.config.bimodal_bias_merging:
            start = self._pair_noise(pair_seeds, NoiseStream.TEXT_RUN_START, 0, latents.shape[1:])
            start = start * self.scheduler.init_noise_sigma
            text_run = _Trajectory(CapturePass.TEXT, start, encoder_hidden_states, uncond_states)

        with capture_cross_attention(self.unet, accumulator):
            if self.config.mode == SamplingMode.GT_CFG:
                self._run_ground_truth_steps(accumulator, latents, encoder_hidden_states, pair_seeds, text_run)
            else:
                main_run = self._start_main_run(latents, encoder_hidden_states, uncond_states, pair_seeds)
                self._denoise(accumulator, [main_run] + ([text_run] if text_run else []), 0, None)
        return accumulator.summaries()

    def _pair_noise(
        self, pair_seeds: list[int], stream: NoiseStream, step_index: int, shape: Sequence[int]
    ) -> torch.Tensor:
        noise = [draw_noise(self.config.seed, seed, stream, step_index, shape) for seed in pair_seeds]
        return torch.stack(noise).to(self.unet.device)

    def _start_main_run(
        self,
        latents: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        uncond_states: torch.Tensor | None,
        pair_seeds: list[int],
    ) -> _Trajectory:
        mode = self.config.mode
        if mode == SamplingMode.GT1_CFG:
            noise = self._pair_noise(pair_seeds, NoiseStream.FIRST_STEP, 0, latents.shape[1:])
            first_timestep = self.scheduler.timesteps[:1].expand(latents.shape[0])
            start = self.scheduler.add_noise(latents, noise, first_timestep)
        else:
            start = self._pair_noise(pair_seeds, NoiseStream.GAUSSIAN_START, 0, latents.shape[1:])
            start = start * self.scheduler.init_noise_sigma
        guided = mode != SamplingMode.TEXT_ONLY
        return _Trajectory(
            CapturePass.MAIN, start, encoder_hidden_states, uncond_states if guided else None
        )

    def _denoise(
        self,
        accumulator: StreamingAttentionAccumulator,
        trajectories: list[_Trajectory],
        first_step: int,
        last_step: int | None,
    ) -> None:
        """Denoise trajectories in one batched forward per step, from first_step to last_step."""
        last_step = len(self.scheduler.timesteps) - 1 if last_step is None else last_step
        for step_index in range(first_step, last_step + 1):
            timestep = self.scheduler.timesteps[step_index]

            # Batch [uncond, cond] per guided trajectory, [cond] otherwise.
            model_inputs, states, blocks = [], [], []
            capture = accumulator.segment_of_step(step_index) is not None
            for trajectory in trajectories:
                scaled = self.scheduler.scale_model_input(trajectory.latents, timestep)
                first_row = sum(input_rows.shape[0] for input_rows in model_inputs)
                if trajectory.uncond_states is not None:
                    model_inputs += [scaled, scaled]
                    states += [trajectory.uncond_states, trajectory.cond_states]
                    first_row += scaled.shape[0]
                else:
                    model_inputs.append(scaled)
                    states.append(trajectory.cond_states)
                if capture:
                    blocks.append(CaptureBlock(trajectory.capture_pass, step_index, first_row))

            model_pred = self._forward(accumulator, blocks, torch.cat(model_inputs), timestep, torch.cat(states))

            # Guidance and the DDIM update, per trajectory.
            offset = 0
            for trajectory in trajectories:
                rows = model_pred[offset : offset + trajectory.num_rows].float()
                offset += trajectory.num_rows
                if trajectory.uncond_states is not None:
                    noise_pred_uncond, noise_pred_cond = rows.chunk(2)
                    guidance = noise_pred_cond - noise_pred_uncond
                    rows = noise_pred_uncond + self.config.guidance_scale * guidance
                trajectory.latents = self.scheduler.step(rows, timestep, trajectory.latents).prev_sample

    def _run_ground_truth_steps(
        self,
        accumulator: StreamingAttentionAccumulator,
        latents: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pair_seeds: list[int],
        text_run: _Trajectory | None,
    ) -> None:
        num_pairs = latents.shape[0]
        num_steps = len(self.scheduler.timesteps)
        window_steps = list(range(num_steps - max(self.config.timestep_windows), num_steps))

        next_text_step = 0
        for chunk_start in range(0, len(window_steps), self.config.steps_per_forward):
            chunk = window_steps[chunk_start : chunk_start + self.config.steps_per_forward]

            # Rows step-major: all pairs at the chunk's first step, then at its second, ...
            noise = torch.cat(
                [self._pair_noise(pair_seeds, NoiseStream.STEP, step, latents.shape[1:]) for step in chunk]
            )
            timesteps = self.scheduler.timesteps[chunk].repeat_interleave(num_pairs)
            noisy_latents = self.scheduler.add_noise(latents.repeat(len(chunk), 1, 1, 1), noise, timesteps)
            model_input = self.scheduler.scale_model_input(noisy_latents, timesteps)
            states = encoder_hidden_states.repeat(len(chunk), 1, 1)
            blocks = [
                CaptureBlock(CapturePass.MAIN, step, position * num_pairs)
                for position, step in enumerate(chunk)
            ]
            self._forward(accumulator, blocks, model_input, timesteps, states)

            # The text run catches up with the captured steps, whose start-token maps it pairs with.
            if text_run is not None:
                self._denoise(accumulator, [text_run], next_text_step, chunk[-1])
                next_text_step = chunk[-1] + 1

    def _forward(
        self,
        accumulator: StreamingAttentionAccumulator,
        blocks: list[CaptureBlock],
        model_input: torch.Tensor,
        timesteps: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
    ) -> torch.Tensor:
        accumulator.begin_capture(blocks)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(model_input.shape[0])
        model_pred = self.unet(
            model_input.to(self.unet.dtype), timesteps, encoder_hidden_states
        ).sample
        accumulator.end_forward()
        return model_pred
