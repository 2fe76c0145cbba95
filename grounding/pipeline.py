"""Scoring of grounding batches: engine run, token selection, maps, masks and metrics.

`GroundingEvaluator.evaluate_batch` turns one grounding batch into per-pair records, one per
(pair, method). The methods scored from a single engine pass are:

- ``cross_attention``: `P_comb` of the main token strategy and timestep window;
- ``bbm/<variant>``: Bimodal Bias Merging of that map (when enabled);
- ``tokens/<strategy>``: `P_comb` of every other token strategy (when compared);
- ``window/<n>``: `P_comb` over the last n steps for each extra window;
- ``layers/res<side>`` and ``layers/<name>``: `P_comb` of one resolution's layers, or of a
  named layer subset;
- ``image_bias``: the start-token map alone, which shows how much comes without the text;
- ``center_prior``: a Gaussian at the image center, which needs no model at all.

The shuffled-caption control is a second pass with other phrases; the callback runs it through
the same method and names it ``shuffled_caption``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from grounding import maps
from grounding.bbm import BBMVariant, bimodal_bias_merge
from grounding.capture import resolve_cross_attention_layers
from grounding.engine import GroundingConfig, GroundingEngine, pair_seed_from_id, parse_choice
from grounding.masks import MapFlag, gmm_mask, upsample_map, upsample_mask
from grounding.metrics import MetricConvention, score_pair
from grounding.tokens import TokenSelection, TokenStrategy, select_all_strategies, select_tokens

log = logging.getLogger(__name__)

# Name of the main map in records and tables.
MAIN_METHOD = "cross_attention"
CENTER_PRIOR_METHOD = "center_prior"
IMAGE_BIAS_METHOD = "image_bias"

# Standard deviation of the center prior, as a fraction of the image side.
CENTER_PRIOR_SIGMA = 0.25

TextEncodeFn = Callable[[list[str]], tuple[torch.Tensor, Any]]


@dataclass
class EvaluationSettings:
    """Settings of the grounding evaluation besides the sampling (see `GroundingConfig`).

    Attributes:
        token_strategy: Token strategy of the main map (``lexical`` in Generate to Ground, MIDL 2025).
        compare_token_strategies: Also score every other strategy from the same pass.
        bbm_variants: Bimodal Bias Merging variants to score; empty disables the text-bias run.
        metric_convention: ``gmm_miou`` (Generate to Ground, MIDL 2025) or ``multi_threshold`` (BioViL-style).
        mask_seed: Seed of the Gaussian mixture of the binary masks.
        image_bias: Score the start-token map alone.
        center_prior: Score a Gaussian at the image center.
        compare_layer_resolutions: Also score the main map of each feature-map resolution's
            layers alone (``layers/res<side>``), when the captured layers span several.
        layer_subsets: Named layer subsets to score from the same pass (``layers/<name>``), each a
            list of ``attn2`` layer names or forward-order indices over all ``attn2`` layers.
    """

    token_strategy: TokenStrategy = TokenStrategy.LEXICAL
    compare_token_strategies: bool = True
    bbm_variants: list[BBMVariant] = field(default_factory=lambda: [BBMVariant.BEZIER])
    metric_convention: MetricConvention = MetricConvention.GMM_MIOU
    mask_seed: int = 0
    image_bias: bool = True
    center_prior: bool = True
    compare_layer_resolutions: bool = True
    layer_subsets: dict[str, list[str | int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.token_strategy = parse_choice(TokenStrategy, self.token_strategy, "token_strategy")
        self.bbm_variants = [parse_choice(BBMVariant, variant, "bbm_variants") for variant in self.bbm_variants]
        self.metric_convention = parse_choice(MetricConvention, self.metric_convention, "metric_convention")
        for name, layers in self.layer_subsets.items():
            if not name or "/" in name:
                raise ValueError(f"Layer subset name {name!r} must be non-empty and without '/'.")
            if not layers:
                raise ValueError(f"Layer subset {name!r} is empty; list attn2 layer names or indices.")


@dataclass
class ScoredMap:
    """One method's map of one pair, at latent and at image resolution, with its scores."""

    method: str
    latent_map: np.ndarray
    image_map: np.ndarray
    image_mask: np.ndarray
    record: dict[str, Any]
    word_maps: list[tuple[str, np.ndarray]] = field(default_factory=list)


def center_prior_map(size: tuple[int, int], sigma_fraction: float = CENTER_PRIOR_SIGMA) -> np.ndarray:
    """Return a ``[h, w]`` Gaussian centered on the grid, with peak 1 and sigma a fraction of the side."""
    height, width = size
    rows = (np.arange(height) + 0.5 - height / 2) / (sigma_fraction * height)
    columns = (np.arange(width) + 0.5 - width / 2) / (sigma_fraction * width)
    return np.exp(-0.5 * (rows[:, None] ** 2 + columns[None, :] ** 2)).astype(np.float32)


def _box_masks(boxes: Sequence[Sequence[float]], size: tuple[int, int]) -> np.ndarray | None:
    from grounding.metrics import rasterize_boxes

    if not boxes:
        return None
    return rasterize_boxes([tuple(box) for box in boxes], size)


def score_map(
    method: str,
    latent_map: np.ndarray,
    gt_mask: np.ndarray,
    boxes: Sequence[Sequence[float]],
    settings: EvaluationSettings,
) -> ScoredMap:
    """Threshold a ``[h, w]`` map in [0, 1] with the GMM, upsample both to the image and score them.

    The map and the mask are upsampled bilinearly to the ground truth's size; the mask is rounded.
    """
    image_size = tuple(gt_mask.shape)
    mask_result = gmm_mask(latent_map, seed=settings.mask_seed)
    image_map = upsample_map(latent_map, image_size)
    image_mask = upsample_mask(mask_result.mask, image_size)

    box_masks = _box_masks(boxes, image_size) if settings.metric_convention is MetricConvention.MULTI_THRESHOLD else None
    scores = score_pair(image_map, gt_mask, image_mask, settings.metric_convention, box_masks)

    record = {"method": method, "mask_flag": mask_result.flag.value, **scores.as_record()}
    return ScoredMap(method, latent_map, image_map, image_mask, record)


class GroundingEvaluator:
    """Scores grounding batches with a U-Net, its scheduler config and a text encoder.

    Args:
        engine_config: Sampling settings. Bimodal Bias Merging is switched on in the engine when
            ``settings.bbm_variants`` is not empty.
        settings: Token, BBM, mask and metric settings.
    """

    def __init__(self, engine_config: GroundingConfig, settings: EvaluationSettings) -> None:
        # Copies, so that the caller's config keeps the windows and BBM switch it asked for.
        self.main_config = replace(
            engine_config,
            bimodal_bias_merging=False,
            extra_timestep_windows=list(engine_config.extra_timestep_windows),
        )
        self.engine_config = replace(self.main_config, bimodal_bias_merging=bool(settings.bbm_variants))
        if settings.bbm_variants:
            # The image and text biases of BBM average every timestep, not only the main window.
            all_steps = engine_config.num_inference_steps
            if all_steps not in self.engine_config.timestep_windows:
                self.engine_config.extra_timestep_windows = [*self.engine_config.extra_timestep_windows, all_steps]
        self.settings = settings
        self.failed_pairs: list[tuple[str, str]] = []
        self._subset_layers: dict[str, list[str]] | None = None

    def check_layers(self, unet: torch.nn.Module) -> dict[str, list[str]]:
        """Resolve the named layer subsets against a U-Net and return their layer names.

        Raises:
            ValueError: If a subset names a layer the U-Net lacks, or one that is not captured.
        """
        captured = set(resolve_cross_attention_layers(unet, self.engine_config.layers))
        subsets = {}
        for name, layers in self.settings.layer_subsets.items():
            try:
                names = resolve_cross_attention_layers(unet, layers)
            except ValueError as error:
                raise ValueError(f"Layer subset {name!r}: {error}") from None
            missing = [layer for layer in names if layer not in captured]
            if missing:
                raise ValueError(f"Layer subset {name!r} needs layers {missing}, which the 'layers' option does not capture.")
            subsets[name] = names
        self._subset_layers = subsets
        return subsets

    def select(self, phrase: str, offsets: Sequence[tuple[int, int]], attention_mask: Sequence[int], finding: str) -> dict[str, TokenSelection]:
        """Select the tokens of every compared strategy, the main one first."""
        if self.settings.compare_token_strategies:
            selections = select_all_strategies(phrase, offsets, attention_mask, finding=finding)
        else:
            main = self.settings.token_strategy
            selections = {main: select_tokens(phrase, offsets, attention_mask, main, finding=finding)}
        return {strategy.value: selection for strategy, selection in selections.items()}

    @torch.no_grad()
    def evaluate_batch(
        self,
        unet: torch.nn.Module,
        scheduler_config: Any,
        encode_text: TextEncodeFn,
        latents: torch.Tensor,
        batch: dict[str, Any],
        phrases: list[str] | None = None,
        main_method: str = MAIN_METHOD,
        only_main: bool = False,
    ) -> list[list[ScoredMap]]:
        """Score every pair of a grounding batch.

        Args:
            unet: The U-Net to read (the EMA weights in training).
            scheduler_config: The training noise scheduler's config.
            encode_text: Maps a list of texts to ``([B, N, D]`` hidden states, encoder output with
                ``offsets`` and ``attention_mask``).
            latents: ``[B, C, h, w]`` scaled latents of the batch's images.
            batch: A grounding batch (``phrases``, ``findings``, ``pair_ids``, ``gt_masks``, ``boxes``).
            phrases: Texts to condition on in place of ``batch["phrases"]`` (shuffled-caption control).
            main_method: Name of the main map's records.
            only_main: Score the main map only (for controls).

        Returns:
            Per pair, the scored maps of every method, the main one first. A pair that cannot be
            scored gets an empty list and an entry in ``failed_pairs`` (pair id, reason).
        """
        texts = list(phrases if phrases is not None else batch["phrases"])
        findings = list(batch["findings"])
        pair_ids = list(batch["pair_ids"])
        results: list[list[ScoredMap]] = [[] for _ in pair_ids]

        # Conditioning and token selections. A pair whose phrase cannot be tokenized is left out.
        hidden_states, encoded = encode_text(texts)
        uncond_states, _ = encode_text([""])
        attention_masks = encoded.attention_mask.detach().cpu().tolist()
        rows, selections = [], []
        for row, text in enumerate(texts):
            try:
                selections.append(self.select(text, encoded.offsets[row], attention_masks[row], findings[row]))
            except ValueError as error:
                self._record_failure(pair_ids[row], main_method, error)
                continue
            rows.append(row)
        if not rows:
            return results

        # One sampling pass for the remaining pairs. The controls need the main map alone, so
        # they skip the text run of Bimodal Bias Merging and the extra windows.
        main_name = self.settings.token_strategy.value
        config = self.main_config if only_main else self.engine_config
        token_sets = [{main_name: list(selection[main_name].positions)} for selection in selections]
        engine = GroundingEngine(unet, scheduler_config, config)
        if self._subset_layers is None:
            self.check_layers(unet)
        summaries = engine.run(
            latents[rows],
            hidden_states[rows],
            uncond_states,
            token_sets if config.bimodal_bias_merging else None,
            [pair_seed_from_id(pair_ids[row]) for row in rows],
        )

        for row, summary, selection in zip(rows, summaries, selections):
            gt_mask = np.asarray(batch["gt_masks"][row].detach().cpu().numpy(), dtype=bool)
            boxes = batch["boxes"][row] if "boxes" in batch else []
            try:
                scored = self._score_pair_maps(summary, selection, gt_mask, boxes, main_method, only_main)
            except ValueError as error:
                self._record_failure(pair_ids[row], main_method, error)
                continue
            context = {
                "pair_id": pair_ids[row],
                "finding": findings[row],
                "phrase": texts[row],
            }
            for item in scored:
                item_selection = selection.get(item.record.get("token_strategy", main_name))
                item.record.update(context)
                if item_selection is not None:
                    item.record.setdefault("token_strategy", item_selection.strategy.value)
                    item.record["tokens"] = " ".join(str(position) for position in item_selection.positions)
                    item.record["words"] = " ".join(item_selection.words)
                    item.record["tagger"] = item_selection.tagger
                    item.record["token_fallback"] = item_selection.fallback or ""
            results[row] = scored
        return results

    def _record_failure(self, pair_id: str, method: str, error: Exception) -> None:
        # One bad pair (for example a phrase with no token) must not end the run.
        log.warning("Skipping grounding pair %s (%s): %s", pair_id, method, error)
        self.failed_pairs.append((pair_id, str(error)))

    def _score_pair_maps(
        self,
        summary: maps.AttentionSummary,
        selections: dict[str, TokenSelection],
        gt_mask: np.ndarray,
        boxes: Sequence[Sequence[float]],
        main_method: str,
        only_main: bool,
    ) -> list[ScoredMap]:
        settings = self.settings
        main_name = settings.token_strategy.value
        main_tokens = list(selections[main_name].positions)
        latent_maps: list[tuple[str, np.ndarray, dict[str, Any]]] = []

        # The main map, then Bimodal Bias Merging of it.
        p_comb = maps.combined_map(summary, main_tokens).cpu().numpy()
        latent_maps.append((main_method, p_comb, {"token_strategy": main_name}))
        if not only_main and settings.bbm_variants:
            all_steps = summary.num_inference_steps
            bbm_inputs = (
                p_comb,
                maps.product_map(summary, main_name, window=all_steps).cpu().numpy(),
                maps.image_bias_mean(summary, window=all_steps).cpu().numpy(),
                maps.text_bias_mean(summary, main_name, window=all_steps).cpu().numpy(),
            )
            finite = all(np.isfinite(array).all() for array in bbm_inputs)
            for variant in settings.bbm_variants:
                if finite:
                    merged = bimodal_bias_merge(*bbm_inputs, variant)
                    merged_map, similarity = merged.merged, merged.similarity
                else:
                    # A NaN map is scored and flagged like a non-finite P_comb, so the pair keeps
                    # its other methods and counts the same with BBM on or off.
                    merged_map, similarity = np.full_like(p_comb, np.nan), float("nan")
                extra = {"token_strategy": main_name, "bbm_similarity": similarity}
                latent_maps.append((f"bbm/{variant.value}", merged_map, extra))

        # Ablations from the same pass: other strategies, other windows, the image bias, the prior.
        if not only_main:
            for name, selection in selections.items():
                if name != main_name:
                    strategy_map = maps.combined_map(summary, list(selection.positions)).cpu().numpy()
                    latent_maps.append((f"tokens/{name}", strategy_map, {"token_strategy": name}))
            # Only the requested windows: the all-steps window that BBM adds is not an ablation.
            for window in self.main_config.timestep_windows:
                if window != summary.main_window:
                    window_map = maps.combined_map(summary, main_tokens, window=window).cpu().numpy()
                    latent_maps.append((f"window/{window}", window_map, {"token_strategy": main_name}))
            for name, layers in self._layer_groups(summary).items():
                layer_map = maps.combined_map(summary, main_tokens, layers=layers).cpu().numpy()
                latent_maps.append((f"layers/{name}", layer_map, {"token_strategy": main_name}))
            if settings.image_bias:
                start_map = maps.combined_map(summary, [0]).cpu().numpy()
                latent_maps.append((IMAGE_BIAS_METHOD, start_map, {"token_strategy": "start"}))
            if settings.center_prior:
                latent_maps.append((CENTER_PRIOR_METHOD, center_prior_map(summary.latent_size), {"token_strategy": ""}))

        scored = []
        for method, latent_map, extra in latent_maps:
            item = score_map(method, latent_map, gt_mask, boxes, settings)
            item.record.update(extra)
            if item.record["mask_flag"] != MapFlag.OK.value:
                log.debug("Pair map %s has mask flag %s", method, item.record["mask_flag"])
            scored.append(item)

        # One map per word token of the main run, for figures that show what each word attends to.
        words = selections.get(TokenStrategy.ALL_WORDS.value)
        if words is not None:
            scored[0].word_maps = [
                (word, maps.combined_map(summary, [position]).cpu().numpy())
                for position, word in zip(words.positions, words.words)
            ]
        return scored

    def _layer_groups(self, summary: maps.AttentionSummary) -> dict[str, list[int] | list[str]]:
        """Return the layer ablations to score: resolution groups, then the named subsets."""
        groups: dict[str, list[int] | list[str]] = {}
        if self.settings.compare_layer_resolutions:
            by_resolution = maps.layers_by_resolution(summary)
            if len(by_resolution) > 1:
                groups.update(by_resolution)
        groups.update(self._subset_layers or {})
        return groups
