"""Streaming accumulation of cross-attention maps and their reduction to activation maps.

The full capture of one pair is conceptually a tensor `T x L x N x h x w` (timesteps, layers,
key tokens, latent grid). `StreamingAttentionAccumulator` never builds it. For every pair it keeps,
on the device, one running sum per captured layer at that layer's own resolution,
`[W, N, h_l, w_l]`, with one slice per timestep window. Nearest upsampling is linear, so it can
wait until reduction. One pass therefore serves any token selection, any configured window and any
layer subset, and the functions below reduce an `AttentionSummary` to:

- `combined_map`: `P_comb`, the mean over the window's timesteps, the chosen layers and the chosen
  tokens of the maps nearest-upsampled to the latent grid, then min-max normalized to [0, 1];
- `image_bias_mean`: the mean start-token map (position 0), the image bias `P_img`;
- `text_bias_mean` (Bimodal Bias Merging): the mean selected-token map of the text run, `P_txt`;
- `product_map` (Bimodal Bias Merging): `P_mult`, the min-max normalized mean over (t, l, k) of
  the matrix products `P_img[t, l] @ P_txt[t, l, k]` of the upsampled maps. The two runs are
  paired per timestep index and layer.

`P_mult` is accumulated while sampling, for the token selections given to the engine, because a
product of per-step maps cannot be recovered from sums. The mean over the selected k is taken
before the product, which is linear in k. For square maps, with `U` the nearest upsampling by an
integer factor f, `U(A) @ U(B) = f * U(A @ B)`, so the product is also taken at layer resolution.
"""

import logging
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum, unique

import torch
import torch.nn.functional as F

from grounding.capture import AttentionStore

logger = logging.getLogger(__name__)

START_TOKEN_POSITION = 0


@unique
class CapturePass(str, Enum):
    """Sampling run that a block of captured batch rows belongs to."""

    MAIN = "main"
    TEXT = "text"


@dataclass(frozen=True)
class CaptureBlock:
    """One pair-ordered block of conditional batch rows in a U-Net forward pass.

    Attributes:
        capture_pass: The sampling run of the rows.
        step_index: Index of the rows' timestep in the sampling schedule (0 is the noisiest).
        first_row: Batch index of the block's first row. The block covers one row per pair.
    """

    capture_pass: CapturePass
    step_index: int
    first_row: int


@dataclass
class AttentionSummary:
    """Accumulated cross-attention of one (image, phrase) pair; tensors stay on the device.

    Attributes:
        pair_seed: The pair's seed, from which all its noise was drawn.
        timestep_windows: Window sizes n in ascending order. Window n covers the last n of the
            `num_inference_steps` sampling steps.
        main_window: The configured main window (one of `timestep_windows`).
        num_inference_steps: Number of sampling steps T.
        layer_names: The captured layers in forward order.
        latent_size: `(h, w)` of the latent grid the maps are upsampled to.
        attention_sums: Per layer, `[W, N, h_l, w_l]` float32: for each window, the sum over its
            steps of the head-averaged probabilities of the main run.
        text_attention_sums: The same for the text run of Bimodal Bias Merging, else `None`.
        product_sums: Per token-selection name, per layer `[W, h_l, w_l]`: for each window, the
            sum over its steps of `P_img @ mean_k P_txt[k]` at layer resolution, else `None`.
        token_sets: The token selections the product sums were accumulated for, else `None`.
    """

    pair_seed: int
    timestep_windows: tuple[int, ...]
    main_window: int
    num_inference_steps: int
    layer_names: tuple[str, ...]
    latent_size: tuple[int, int]
    attention_sums: list[torch.Tensor]
    text_attention_sums: list[torch.Tensor] | None = None
    product_sums: dict[str, list[torch.Tensor]] | None = None
    token_sets: dict[str, list[int]] | None = None

    @property
    def num_tokens(self) -> int:
        """Number of key tokens N."""
        return self.attention_sums[0].shape[1]


def layer_grid_size(num_queries: int, latent_size: tuple[int, int]) -> tuple[int, int]:
    """Find the feature-map size of a layer from its number of query positions.

    Args:
        num_queries: Q = h_l * w_l.
        latent_size: `(h, w)` of the U-Net input.

    Returns:
        `(h_l, w_l)` with `h_l = ceil(h / 2^k)`, `w_l = ceil(w / 2^k)` for the first k that fits.

    Raises:
        ValueError: If no downsampling factor 2^k gives Q positions.
    """
    height, width = latent_size
    factor = 1
    while factor <= max(height, width):
        grid = (math.ceil(height / factor), math.ceil(width / factor))
        if grid[0] * grid[1] == num_queries:
            return grid
        factor *= 2
    raise ValueError(
        f"A layer with {num_queries} query positions does not fit a {height}x{width} latent "
        "downsampled by a power of two."
    )


class StreamingAttentionAccumulator(AttentionStore):
    """Attention store that sums maps per pair, window and layer while the U-Net runs.

    Args:
        layer_names: The captured layers in forward order.
        num_pairs: Number of pairs P. Every capture block covers P rows in pair order.
        latent_size: `(h, w)` of the latent grid.
        num_inference_steps: Number of sampling steps T.
        timestep_windows: Window sizes (last n of T), any order, without duplicates.
        main_window: The configured main window, one of `timestep_windows`.
        pair_seeds: One seed per pair, copied into the summaries.
        token_sets: Per pair, token-selection name -> positions, all pairs with the same names.
            Given only with Bimodal Bias Merging, where it enables the text run's product sums.
    """

    def __init__(
        self,
        layer_names: Sequence[str],
        num_pairs: int,
        latent_size: tuple[int, int],
        num_inference_steps: int,
        timestep_windows: Sequence[int],
        main_window: int,
        pair_seeds: Sequence[int],
        token_sets: Sequence[dict[str, list[int]]] | None = None,
    ) -> None:
        super().__init__(layer_names)
        self.num_pairs = num_pairs
        self.latent_size = latent_size
        self.num_inference_steps = num_inference_steps
        self.timestep_windows = tuple(sorted(timestep_windows))
        self.main_window = main_window
        self.pair_seeds = list(pair_seeds)
        self.token_sets = None if token_sets is None else [dict(tokens) for tokens in token_sets]
        self.selection_names = [] if token_sets is None else list(token_sets[0])

        # Steps of window i that are not in window i - 1 form segment i, so each step is added
        # once and the window sums are the cumulative sums over segments.
        self._segment_starts = [num_inference_steps - n for n in self.timestep_windows]
        self._blocks: list[CaptureBlock] = []
        self._sums: dict[CapturePass, list[torch.Tensor | None]] = {
            capture_pass: [None] * len(self.layer_names) for capture_pass in CapturePass
        }
        self._product_sums: list[torch.Tensor | None] = [None] * len(self.layer_names)
        self._selection_weights: torch.Tensor | None = None
        self._image_bias_buffer: list[dict[int, torch.Tensor]] = [{} for _ in self.layer_names]

    def segment_of_step(self, step_index: int) -> int | None:
        """Return the segment of a step: the smallest window containing it, or None."""
        for segment, start in enumerate(self._segment_starts):
            if step_index >= start:
                return segment
        return None

    def begin_capture(self, blocks: Sequence[CaptureBlock]) -> None:
        """Start a forward pass that captures the given blocks (main-run blocks first).

        Raises:
            ValueError: If a block's step lies outside every window.
        """
        for block in blocks:
            if self.segment_of_step(block.step_index) is None:
                raise ValueError(f"Step {block.step_index} lies outside every timestep window.")
        self._blocks = list(blocks)
        rows = [block.first_row + pair for block in self._blocks for pair in range(self.num_pairs)]
        self.begin_forward(rows)

    def record(self, layer_position: int, attention_probs: torch.Tensor) -> None:
        """Add the `[len(blocks) * P, Q, N]` maps of one layer to the running sums."""
        num_queries = attention_probs.shape[1]
        blocks_probs = attention_probs.view(len(self._blocks), self.num_pairs, num_queries, -1)

        for capture_pass in CapturePass:
            positions = [i for i, block in enumerate(self._blocks) if block.capture_pass == capture_pass]
            if not positions:
                continue
            probs = blocks_probs if len(positions) == len(self._blocks) else blocks_probs[positions]
            segments = [self.segment_of_step(self._blocks[i].step_index) for i in positions]
            layer_sums = self._layer_sums(capture_pass, layer_position, probs)
            if len(set(segments)) == 1:
                layer_sums[segments[0]] += probs.sum(dim=0)
            else:
                layer_sums.index_add_(0, torch.tensor(segments, device=probs.device), probs)

            if self.token_sets is not None:
                steps = [self._blocks[i].step_index for i in positions]
                if capture_pass == CapturePass.MAIN:
                    self._buffer_image_bias(layer_position, steps, probs)
                else:
                    self._add_products(layer_position, steps, segments, probs)

    def _layer_sums(
        self, capture_pass: CapturePass, layer_position: int, probs: torch.Tensor
    ) -> torch.Tensor:
        layer_sums = self._sums[capture_pass][layer_position]
        if layer_sums is None:
            # [segments, P, Q, N], the layout of the blocks, so that they add without a copy.
            num_queries, num_tokens = probs.shape[-2:]
            layer_sums = probs.new_zeros(
                len(self.timestep_windows), self.num_pairs, num_queries, num_tokens
            )
            self._sums[capture_pass][layer_position] = layer_sums
        return layer_sums

    def _buffer_image_bias(
        self, layer_position: int, steps: list[int], probs: torch.Tensor
    ) -> None:
        # Start-token maps wait for the text run's step with the same index. The copy lets the
        # whole [P, Q, N] probabilities of the step be freed, where a view would keep them alive.
        for step, step_probs in zip(steps, probs):
            self._image_bias_buffer[layer_position][step] = step_probs[..., START_TOKEN_POSITION].clone()

    def _add_products(
        self, layer_position: int, steps: list[int], segments: list[int], probs: torch.Tensor
    ) -> None:
        num_queries, num_tokens = probs.shape[-2:]
        grid = layer_grid_size(num_queries, self.latent_size)
        if grid[0] != grid[1] or self.latent_size[0] % grid[0] != 0:
            raise ValueError(
                "Bimodal Bias Merging multiplies maps as matrices and needs a square latent whose "
                f"side every layer's side divides, got {self.latent_size[0]}x{self.latent_size[1]} "
                f"with a {grid[0]}x{grid[1]} layer."
            )
        weights = self._weights(num_tokens, probs.device)
        if self._product_sums[layer_position] is None:
            self._product_sums[layer_position] = probs.new_zeros(
                self.num_pairs, len(self.timestep_windows), len(self.selection_names), *grid
            )

        for step, segment, step_probs in zip(steps, segments, probs):
            image_bias = self._image_bias_buffer[layer_position].pop(step, None)
            if image_bias is None:
                raise RuntimeError(
                    f"The text run reached step {step} of layer {self.layer_names[layer_position]} "
                    "before the main run captured it. The main-run blocks must be captured first."
                )
            # [P, Q, N] x [P, N, S] -> [P, S, Q]: the mean over each selection's tokens.
            text_bias = torch.bmm(step_probs, weights).transpose(1, 2).unflatten(-1, grid)
            product = torch.matmul(image_bias.unflatten(-1, grid).unsqueeze(1), text_bias)
            self._product_sums[layer_position][:, segment] += product

    def _weights(self, num_tokens: int, device: torch.device) -> torch.Tensor:
        if self._selection_weights is None:
            weights = torch.zeros(self.num_pairs, num_tokens, len(self.selection_names))
            for pair, selections in enumerate(self.token_sets):
                for column, name in enumerate(self.selection_names):
                    positions = selections[name]
                    if positions:
                        weights[pair, positions, column] = 1.0 / len(positions)
            self._selection_weights = weights.to(device)
        return self._selection_weights

    def summaries(self) -> list[AttentionSummary]:
        """Build one summary per pair from the running sums.

        Raises:
            RuntimeError: If a layer captured nothing, or a main-run step never got its text-run
                step.
        """
        main_sums = self._sums[CapturePass.MAIN]
        if any(layer_sums is None for layer_sums in main_sums):
            raise RuntimeError("No attention was captured. Run the engine before reading summaries.")
        if self.token_sets is not None and any(self._image_bias_buffer):
            raise RuntimeError("Some main-run steps never got the matching text-run step.")

        summaries = []
        for pair in range(self.num_pairs):
            summary = AttentionSummary(
                pair_seed=self.pair_seeds[pair],
                timestep_windows=self.timestep_windows,
                main_window=self.main_window,
                num_inference_steps=self.num_inference_steps,
                layer_names=tuple(self.layer_names),
                latent_size=self.latent_size,
                attention_sums=self._window_maps(main_sums, pair),
            )
            if self.token_sets is not None:
                summary.text_attention_sums = self._window_maps(self._sums[CapturePass.TEXT], pair)
                summary.token_sets = self.token_sets[pair]
                summary.product_sums = {
                    name: [layer_sums[pair, :, column].cumsum(0) for layer_sums in self._product_sums]
                    for column, name in enumerate(self.selection_names)
                }
            summaries.append(summary)
        return summaries

    def _window_maps(self, sums: list[torch.Tensor | None], pair: int) -> list[torch.Tensor]:
        window_maps = []
        for layer_sums in sums:
            if layer_sums is None:
                raise RuntimeError("A layer captured no attention in the text run.")
            grid = layer_grid_size(layer_sums.shape[2], self.latent_size)
            window_maps.append(layer_sums[:, pair].cumsum(0).transpose(1, 2).unflatten(-1, grid))
        return window_maps


def min_max_normalize(attention_map: torch.Tensor) -> torch.Tensor:
    """Scale a map linearly to [0, 1]; a constant map becomes all zeros."""
    low = attention_map.min()
    span = attention_map.max() - low
    if span <= 0:
        return torch.zeros_like(attention_map)
    return (attention_map - low) / span


def _window_position(summary: AttentionSummary, window: int | None) -> int:
    window = summary.main_window if window is None else window
    if window not in summary.timestep_windows:
        raise ValueError(
            f"Window {window} was not accumulated. Available windows: {summary.timestep_windows}. "
            "Add it to the engine's extra_timestep_windows."
        )
    return summary.timestep_windows.index(window)


def _layer_positions(summary: AttentionSummary, layers: Sequence[str | int] | None) -> list[int]:
    if layers is None:
        return list(range(len(summary.layer_names)))
    if len(layers) == 0:
        raise ValueError("The layer selection is empty. Pass None to use every captured layer.")

    positions = []
    for layer in layers:
        if isinstance(layer, int) and not isinstance(layer, bool):
            if not 0 <= layer < len(summary.layer_names):
                raise ValueError(
                    f"Layer index {layer} is out of range: {len(summary.layer_names)} layers "
                    "were captured."
                )
            positions.append(layer)
        elif layer in summary.layer_names:
            positions.append(summary.layer_names.index(layer))
        else:
            raise ValueError(f"Layer {layer!r} was not captured. Captured layers: {summary.layer_names}.")
    return sorted(set(positions))


def layers_by_resolution(summary: AttentionSummary) -> dict[str, list[int]]:
    """Group the captured layers by the side of their feature map, for resolution ablations.

    Returns:
        ``res<h_l>`` -> layer positions in `summary.layer_names`, from the coarsest
        resolution to the finest, for example ``{"res8": [6], "res16": [4, 5, 7, 8, 9], ...}``
        for SD 1.5 at a 64x64 latent. Layers whose maps are not square are keyed by ``<h>x<w>``.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for position, sums in enumerate(summary.attention_sums):
        groups.setdefault(tuple(sums.shape[-2:]), []).append(position)

    named = {}
    for height, width in sorted(groups):
        name = f"res{height}" if height == width else f"{height}x{width}"
        named[name] = groups[(height, width)]
    return named


def _check_tokens(tokens: Sequence[int], num_tokens: int) -> list[int]:
    if len(tokens) == 0:
        raise ValueError("The token selection is empty, but a map needs at least one token position.")
    for position in tokens:
        valid_type = isinstance(position, numbers.Integral) and not isinstance(position, bool)
        if not valid_type or not 0 <= position < num_tokens:
            raise ValueError(f"Invalid token position {position!r}: expected an int in [0, {num_tokens}).")
    return [int(position) for position in tokens]


def _mean_map(
    sums: list[torch.Tensor],
    summary: AttentionSummary,
    tokens: Sequence[int],
    window: int | None,
    layers: Sequence[str | int] | None,
) -> torch.Tensor:
    window_position = _window_position(summary, window)
    layer_positions = _layer_positions(summary, layers)
    tokens = _check_tokens(tokens, summary.num_tokens)

    total = None
    for layer in layer_positions:
        layer_map = sums[layer][window_position, tokens].sum(dim=0)
        upsampled = F.interpolate(layer_map[None, None], size=summary.latent_size, mode="nearest")[0, 0]
        total = upsampled if total is None else total + upsampled
    num_steps = summary.timestep_windows[window_position]
    return total / (num_steps * len(layer_positions) * len(tokens))


def combined_map(
    summary: AttentionSummary,
    tokens: Sequence[int],
    window: int | None = None,
    layers: Sequence[str | int] | None = None,
) -> torch.Tensor:
    """Reduce a summary to the activation map `P_comb` of chosen tokens.

    Args:
        summary: The pair's accumulated attention.
        tokens: Token positions k (0 is the start token).
        window: Window size n, one of `summary.timestep_windows`; `None` is the main window.
        layers: Layer names or positions in `summary.layer_names`; `None` is every layer.

    Returns:
        `[h, w]` float32 on the summary's device: the mean over the window's timesteps, the
        layers and the tokens of the upsampled maps, min-max normalized to [0, 1].

    Raises:
        ValueError: If the window was not accumulated, or a layer or token position is invalid
            or the selection is empty.
    """
    return min_max_normalize(_mean_map(summary.attention_sums, summary, tokens, window, layers))


def image_bias_mean(
    summary: AttentionSummary,
    window: int | None = None,
    layers: Sequence[str | int] | None = None,
) -> torch.Tensor:
    """Average the start-token maps (the image bias `P_img`) over timesteps and layers.

    Returns:
        `[h, w]` float32, not normalized: the mean start-token probability of each latent pixel.
    """
    return _mean_map(summary.attention_sums, summary, [START_TOKEN_POSITION], window, layers)


def _check_bbm(summary: AttentionSummary, selection: str) -> list[int]:
    if summary.product_sums is None or summary.text_attention_sums is None:
        raise ValueError("The summary has no text run. Enable bimodal_bias_merging in the engine config.")
    if selection not in summary.product_sums:
        raise ValueError(
            f"Token selection {selection!r} was not given to the engine. "
            f"Available: {sorted(summary.product_sums)}."
        )
    return summary.token_sets[selection]


def text_bias_mean(
    summary: AttentionSummary,
    selection: str,
    window: int | None = None,
    layers: Sequence[str | int] | None = None,
) -> torch.Tensor:
    """Average the text run's maps of a named token selection (the text bias `P_txt`).

    Returns:
        `[h, w]` float32, not normalized.

    Raises:
        ValueError: If the summary has no text run, the selection is unknown or empty, or the
            window or layers are invalid.
    """
    tokens = _check_bbm(summary, selection)
    return _mean_map(summary.text_attention_sums, summary, tokens, window, layers)


def product_map(
    summary: AttentionSummary,
    selection: str,
    window: int | None = None,
    layers: Sequence[str | int] | None = None,
) -> torch.Tensor:
    """Reduce the product sums to `P_mult` for a named token selection.

    `P_mult` is the mean over the window's timesteps t, the layers l and the selected tokens k
    of `U(P_img[t, l]) @ U(P_txt[t, l, k])` with `U` the nearest upsampling to the latent grid,
    then min-max normalized to [0, 1].

    NOTE: Bimodal Bias Merging defines `P_img` and `P_txt` over every timestep of the two runs,
    while this function uses the given window. For every timestep, accumulate the window T (`extra_timestep_windows`)
    and pass `window=T` here and to `image_bias_mean` and `text_bias_mean`.

    Returns:
        `[h, w]` float32 in [0, 1].

    Raises:
        ValueError: As `text_bias_mean`.
    """
    _check_tokens(_check_bbm(summary, selection), summary.num_tokens)
    window_position = _window_position(summary, window)
    layer_positions = _layer_positions(summary, layers)

    total = None
    for layer in layer_positions:
        layer_product = summary.product_sums[selection][layer][window_position]
        factor = summary.latent_size[0] // layer_product.shape[0]
        upsampled = F.interpolate(layer_product[None, None], size=summary.latent_size, mode="nearest")
        upsampled = factor * upsampled[0, 0]
        total = upsampled if total is None else total + upsampled
    num_steps = summary.timestep_windows[window_position]
    return min_max_normalize(total / (num_steps * len(layer_positions)))
