"""Validation callback that grounds each pair's phrase in its image and scores the maps."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from callbacks.overlays import add_caption, pad_to_common_size, render_overlay, render_word_maps, side_by_side
from grounding.capture import CaptureError
from grounding.engine import GroundingConfig, pair_seed_from_id
from grounding.pipeline import CENTER_PRIOR_METHOD, IMAGE_BIAS_METHOD, MAIN_METHOD, EvaluationSettings, GroundingEvaluator, ScoredMap
from grounding.results import HEADLINE_METRICS, strict_json, summarize_records, write_results

log = logging.getLogger(__name__)

SHUFFLED_METHOD = "shuffled_caption"
UNTRAINED_METHOD = "untrained"

# A phrase per MS-CXR finding, for the shuffled-caption control when no pair of another finding
# has been seen yet in the evaluation.
FALLBACK_PHRASES = {
    "Atelectasis": "atelectasis",
    "Cardiomegaly": "cardiomegaly",
    "Consolidation": "consolidation",
    "Edema": "pulmonary edema",
    "Lung Opacity": "lung opacity",
    "Pleural Effusion": "pleural effusion",
    "Pneumonia": "pneumonia",
    "Pneumothorax": "pneumothorax",
}


class GroundingEvaluation(Callback):
    """Ground every validation (and test) pair's phrase from the EMA U-Net's cross-attention.

    For each grounding batch it runs the sampling mode, builds the maps (the main map, Bimodal
    Bias Merging, token strategies, timestep windows, the image bias and a center prior) and scores
    them. At the end of the epoch the records of all ranks are gathered and deduplicated by pair
    id (the distributed sampler pads with duplicates), so each pair counts once; the per-finding,
    weighted and plain means are logged with ``self.log``, overlays go to W&B, and the per-pair
    CSV, the tables and ``summary.json`` are written to ``output_dir``.

    Args:
        output_dir: Folder of the result files; ``None`` is ``<trainer.default_root_dir>/grounding``.
        every_n_validations: Ground every n-th validation run (the first always runs).
        max_pairs: Ground at most this many pairs per evaluation (all ranks together); ``None`` for all.
        mode: Sampling mode: ``gt_cfg`` (main), ``gt1_cfg``, ``cfg`` or ``text_only``.
        num_inference_steps: DDIM steps T.
        guidance_scale: Classifier-free guidance scale.
        timestep_window: The maps average the last n of the T steps.
        extra_timestep_windows: More windows scored from the same pass.
        layers: Captured ``attn2`` layers by name or forward-order index; ``None`` for all.
        steps_per_forward: Timesteps per batched U-Net forward in ``gt_cfg`` mode.
        seed: Seed of the sampling noise.
        token_strategy: Tokens of the main map: ``lexical``, ``disease``, ``all_words``, ``start``, ``end``.
        compare_token_strategies: Also score every other token strategy.
        bbm_variants: Bimodal Bias Merging variants to score (``bezier``, ``linear``, ``quadratic``);
            an empty list skips the extra text-bias sampling run.
        metric_convention: ``gmm_miou`` (Generate to Ground, MIDL 2025) or ``multi_threshold``.
        shuffled_caption: Also score each pair with the phrase of a pair of another finding.
        image_bias: Also score the start-token map alone.
        center_prior: Also score a Gaussian at the image center.
        evaluate_untrained: Score an untrained U-Net once before training starts (row ``untrained``).
        untrained_weights: ``initial``: the weights training starts from (for example SD 1.5's);
            ``random``: a randomly initialised U-Net of the same config, for a run that starts from
            already fine-tuned weights, such as the demo's shipped checkpoint.
        num_overlays: Overlays logged per evaluation.
        num_token_figures: Pairs per evaluation shown with one map per word token.
        mask_seed: Seed of the Gaussian mixture of the binary masks.
        compare_layer_resolutions: Also score each feature-map resolution's layers alone.
        layer_subsets: Named ``attn2`` layer subsets (names or forward-order indices) scored from
            the same pass, for example ``{"inner": [5, 6, 7]}``.
    """

    def __init__(
        self,
        output_dir: str | None = None,
        every_n_validations: int = 1,
        max_pairs: int | None = None,
        mode: str = "gt_cfg",
        num_inference_steps: int = 50,
        guidance_scale: float = 16.0,
        timestep_window: int = 40,
        extra_timestep_windows: list[int] | None = None,
        layers: list[str | int] | None = None,
        steps_per_forward: int = 10,
        seed: int = 0,
        token_strategy: str = "lexical",
        compare_token_strategies: bool = True,
        bbm_variants: list[str] | None = None,
        metric_convention: str = "gmm_miou",
        shuffled_caption: bool = True,
        image_bias: bool = True,
        center_prior: bool = True,
        evaluate_untrained: bool = False,
        untrained_weights: str = "initial",
        num_overlays: int = 8,
        num_token_figures: int = 2,
        mask_seed: int = 0,
        compare_layer_resolutions: bool = True,
        layer_subsets: dict[str, list[str | int]] | None = None,
    ) -> None:
        super().__init__()
        if every_n_validations < 1:
            raise ValueError(f"every_n_validations must be at least 1, got {every_n_validations}.")
        if max_pairs is not None and max_pairs < 1:
            raise ValueError(f"max_pairs must be positive or null, got {max_pairs}.")

        self.output_dir = output_dir
        self.every_n_validations = every_n_validations
        self.max_pairs = max_pairs
        self.engine_config = GroundingConfig(
            mode=mode,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            timestep_window=timestep_window,
            extra_timestep_windows=list(extra_timestep_windows or []),
            layers=layers,
            seed=seed,
            steps_per_forward=steps_per_forward,
        )
        self.settings = EvaluationSettings(
            token_strategy=token_strategy,
            compare_token_strategies=compare_token_strategies,
            bbm_variants=["bezier"] if bbm_variants is None else list(bbm_variants),
            metric_convention=metric_convention,
            mask_seed=mask_seed,
            image_bias=image_bias,
            center_prior=center_prior,
            compare_layer_resolutions=compare_layer_resolutions,
            layer_subsets=dict(layer_subsets or {}),
        )
        self.evaluator = GroundingEvaluator(self.engine_config, self.settings)
        self.shuffled_caption = shuffled_caption
        if untrained_weights not in ("initial", "random"):
            raise ValueError(f"untrained_weights must be 'initial' or 'random', got {untrained_weights!r}.")
        self.evaluate_untrained = evaluate_untrained
        self.untrained_weights = untrained_weights
        self.num_overlays = num_overlays
        self.num_token_figures = num_token_figures
        self._token_figures: list[tuple[Any, str]] = []

        self._validation_runs = 0
        self._active = False
        self._records: list[dict[str, Any]] = []
        self._overlays: list[tuple[Any, str]] = []
        self._phrase_pool: list[tuple[str, str]] | None = None
        self._batch_phrases: list[tuple[str, str]] = []
        self._pairs_seen = 0
        self._failed_batches = 0
        self._checkpoint_step: int | None = None
        self.summary_rows: dict[str, dict[str, Any]] = {}

    # ----------------------------------------------------------------------------------------
    # Hooks.

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # A misnamed layer subset stops the run here, before any training step.
        self.evaluator.check_layers(pl_module.ema_unet)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.evaluate_untrained:
            return
        rank_zero_info(f"Grounding with the untrained U-Net ({self.untrained_weights} weights), before fine-tuning")
        unet = pl_module.ema_unet if self.untrained_weights == "initial" else _random_unet_like(pl_module.ema_unet, self.engine_config.seed)
        dataloader = trainer.datamodule.val_dataloader()
        self._start(trainer, dataloader)
        for batch_idx, batch in enumerate(dataloader):
            if batch_idx % trainer.world_size != trainer.global_rank:
                continue
            batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
            self._evaluate(trainer, pl_module, batch, with_controls=False, unet=unet)
        summary = self._finish(trainer, pl_module, "untrained", log_metrics=False)
        if summary:
            self.summary_rows[UNTRAINED_METHOD] = {**summary["methods"][MAIN_METHOD]["overall"], "split": "val", "step": 0}
            self._write_summary(trainer)

    @override
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            self._active = False
            return
        self._active = self._validation_runs % self.every_n_validations == 0
        self._validation_runs += 1
        if self._active:
            self._start(trainer, trainer.val_dataloaders)

    @override
    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._active = True
        self._start(trainer, trainer.test_dataloaders)

    @override
    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._active:
            self._evaluate(trainer, pl_module, batch, with_controls=True)

    @override
    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._active:
            self._evaluate(trainer, pl_module, batch, with_controls=True)

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._active:
            self._finish_with_rows(trainer, pl_module, "val")
        self._active = False

    @override
    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._active:
            self._finish_with_rows(trainer, pl_module, "test")
        self._active = False

    @override
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # validate and test do not restore the loop progress, so trainer.global_step stays 0 there.
        # The checkpoint's own step names their result folder instead.
        self._checkpoint_step = checkpoint.get("global_step")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"validation_runs": self._validation_runs, "summary_rows": self.summary_rows}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._validation_runs = int(state_dict.get("validation_runs", 0))
        self.summary_rows = dict(state_dict.get("summary_rows", {}))

    # ----------------------------------------------------------------------------------------
    # Evaluation.

    def _start(self, trainer: L.Trainer, dataloader: Any = None) -> None:
        self._records = []
        self._overlays = []
        self._token_figures = []
        self._pairs_seen = 0
        self._failed_batches = 0
        self.evaluator.failed_pairs = []
        self._batch_phrases = []
        self._phrase_pool = _phrase_pool(dataloader)

    def _pair_budget(self, trainer: L.Trainer) -> int | None:
        if self.max_pairs is None:
            return None
        return max(1, -(-self.max_pairs // trainer.world_size))

    def _evaluate(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        batch: dict[str, Any],
        with_controls: bool,
        unet: torch.nn.Module | None = None,
    ) -> None:
        """Score one grounding batch with ``unet`` (the EMA U-Net by default); a failing batch is logged and counted."""
        unet = unet if unet is not None else pl_module.ema_unet
        budget = self._pair_budget(trainer)
        if budget is not None and self._pairs_seen >= budget:
            return
        if not batch or len(batch.get("pair_ids", [])) == 0:
            return
        if budget is not None and self._pairs_seen + len(batch["pair_ids"]) > budget:
            batch = _slice_batch(batch, budget - self._pairs_seen)
        self._pairs_seen += len(batch["pair_ids"])
        if self._phrase_pool is None:
            self._batch_phrases.extend(zip(batch["phrases"], batch["findings"]))

        def encode(texts: list[str]) -> tuple[torch.Tensor, Any]:
            return pl_module.encode_text(texts, use_ema=True)

        try:
            latents = pl_module.encode_images(batch["pixel_values"])
            results = self.evaluator.evaluate_batch(unet, pl_module.noise_scheduler.config, encode, latents, batch)
            if with_controls and self.shuffled_caption:
                control = self.evaluator.evaluate_batch(
                    unet,
                    pl_module.noise_scheduler.config,
                    encode,
                    latents,
                    batch,
                    phrases=self._shuffled_phrases(batch),
                    main_method=SHUFFLED_METHOD,
                    only_main=True,
                )
                results = [pair + extra for pair, extra in zip(results, control)]
        except CaptureError:
            # A layer setup that loses the capture fails every batch alike, so it stops the run.
            raise
        except (RuntimeError, ValueError) as error:
            self._failed_batches += 1
            log.error("Grounding failed on pairs %s: %s", list(batch["pair_ids"]), error)
            return

        for row, pair_results in enumerate(results):
            self._records.extend(item.record for item in pair_results)
            if not pair_results or not trainer.is_global_zero:
                continue
            if len(self._overlays) < self.num_overlays:
                self._overlays.append(_render_pair(batch, row, pair_results))
            if len(self._token_figures) < self.num_token_figures and pair_results[0].word_maps:
                self._token_figures.append(_render_word_maps(batch, row, pair_results[0]))

    def _shuffled_phrases(self, batch: dict[str, Any]) -> list[str]:
        """Pick, for each pair, a phrase of another finding, deterministically from its id.

        The candidates are the phrases of the whole evaluation data set, so the choice does not
        depend on the batch size or on how pairs are split across ranks. A data set that does
        not list its pairs falls back to the phrases seen so far.
        """
        pool = self._phrase_pool if self._phrase_pool is not None else self._batch_phrases
        phrases = []
        for pair_id, finding in zip(batch["pair_ids"], batch["findings"]):
            candidates = [phrase for phrase, other in pool if other != finding]
            if not candidates:
                candidates = [phrase for name, phrase in FALLBACK_PHRASES.items() if name != finding]
            phrases.append(candidates[pair_seed_from_id(pair_id) % len(candidates)])
        return phrases

    def _gather(self, trainer: L.Trainer) -> list[dict[str, Any]]:
        if trainer.world_size == 1 or not dist.is_available() or not dist.is_initialized():
            return self._records
        gathered: list[list[dict[str, Any]]] = [[] for _ in range(trainer.world_size)]
        dist.all_gather_object(gathered, self._records)
        failed = [(0, []) for _ in range(trainer.world_size)]
        dist.all_gather_object(failed, (self._failed_batches, self.evaluator.failed_pairs))
        self._failed_batches = sum(count for count, _ in failed)
        self.evaluator.failed_pairs = sorted({pair for _, pairs in failed for pair in pairs})
        return _drop_padding_duplicates(record for records in gathered for record in records)

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str, log_metrics: bool) -> dict[str, Any] | None:
        """Gather, aggregate, log and write the results of one evaluation; returns the summary."""
        records = self._gather(trainer)
        if not records:
            log.warning("Grounding evaluation (%s) scored no pair.", stage)
            return None
        summary = summarize_records(records)
        summary["failed_batches"] = self._failed_batches
        summary["failed_pairs"] = [{"pair_id": pair_id, "reason": reason} for pair_id, reason in self.evaluator.failed_pairs]
        if summary["failed_pairs"] or self._failed_batches:
            log.warning(
                "Grounding (%s): %d pairs and %d batches could not be scored; see summary.json.",
                stage,
                len(summary["failed_pairs"]),
                self._failed_batches,
            )

        if log_metrics:
            for key, value in _flatten_for_logging(summary, stage).items():
                pl_module.log(key, value, sync_dist=True, batch_size=1)
        if trainer.is_global_zero:
            directory = self._output_dir(trainer) / f"{stage}-step{self._result_step(trainer):06d}"
            write_results(records, summary, directory)
            self._log_overlays(trainer, stage, directory, records)
            rank_zero_info(
                f"Grounding ({stage}, {summary['num_pairs']} pairs): "
                + ", ".join(
                    f"{name}={summary['methods'][MAIN_METHOD]['overall'][name]:.3f}" for name in HEADLINE_METRICS
                )
                + f"; results in {directory}"
            )
        return summary

    def _finish_with_rows(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        summary = self._finish(trainer, pl_module, stage, log_metrics=True)
        if not summary:
            return
        methods = summary["methods"]
        # Each row names its split and step, because validate and test update the same file.
        source = {"split": stage, "step": self._result_step(trainer)}
        self.summary_rows["trained"] = {**methods[MAIN_METHOD]["overall"], **source}
        for name in (CENTER_PRIOR_METHOD, SHUFFLED_METHOD, IMAGE_BIAS_METHOD):
            if name in methods:
                self.summary_rows[name] = {**methods[name]["overall"], **source}
        self._write_summary(trainer)

    def _result_step(self, trainer: L.Trainer) -> int:
        """Return the training step of the evaluated weights: the trainer's while fitting, else the checkpoint's."""
        if trainer.state.fn == TrainerFn.FITTING or self._checkpoint_step is None:
            return trainer.global_step
        return int(self._checkpoint_step)

    def _output_dir(self, trainer: L.Trainer) -> Path:
        return Path(self.output_dir) if self.output_dir else Path(trainer.default_root_dir) / "grounding"

    def _write_summary(self, trainer: L.Trainer) -> None:
        if not trainer.is_global_zero:
            return
        path = self._output_dir(trainer) / "summary.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(strict_json(dict(sorted(self.summary_rows.items()))))

    def _log_overlays(self, trainer: L.Trainer, stage: str, directory: Path, records: list[dict[str, Any]]) -> None:
        """Save the overlays and word-map figures as PNGs and log them, with a table of pairs, to W&B."""
        figures = {"overlays": self._overlays, "token_maps": self._token_figures}
        for folder, items in figures.items():
            if items:
                (directory / folder).mkdir(parents=True, exist_ok=True)
            for index, (image, _) in enumerate(items):
                image.save(directory / folder / f"{index:02d}.png")

        for logger in trainer.loggers:
            if not isinstance(logger, WandbLogger):
                continue
            for folder, items in figures.items():
                if items:
                    images = pad_to_common_size([image for image, _ in items])
                    captions = [caption for _, caption in items]
                    logger.log_image(key=f"{stage}/grounding/{folder}", images=images, caption=captions, step=trainer.global_step)
            main_rows = [record for record in records if record["method"] == MAIN_METHOD]
            logger.log_table(key=f"{stage}/grounding/pairs", dataframe=pd.DataFrame(main_rows), step=trainer.global_step)


def _phrase_pool(dataloader: Any) -> list[tuple[str, str]] | None:
    """List the (phrase, finding) of every pair of an evaluation loader, ordered by pair id."""
    loaders = dataloader if isinstance(dataloader, (list, tuple)) else [dataloader]
    pool = []
    for loader in loaders:
        pairs = getattr(getattr(loader, "dataset", None), "pairs", None)
        if pairs is None:
            return None
        pool += [(pair.pair_id, pair.phrase, pair.finding) for pair in pairs]
    return [(phrase, finding) for _, phrase, finding in sorted(pool)]


def _random_unet_like(unet: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Build a randomly initialised U-Net with the config, device and dtype of ``unet``."""
    from diffusers import UNet2DConditionModel

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    random_unet = UNet2DConditionModel.from_config(unet.config)
    torch.random.set_rng_state(state)
    return random_unet.to(device=unet.device, dtype=unet.dtype).eval()


def _drop_padding_duplicates(records: Any) -> list[dict[str, Any]]:
    """Keep the first record of each (pair, method), in rank order.

    The distributed sampler repeats pairs to even out the ranks. A repeated pair sits in a batch
    of other pairs, where batched matrix products round differently, so its metrics can differ in
    the last digits. The copy of the lower rank is kept.
    """
    kept: dict[tuple[str, str], dict[str, Any]] = {}
    for record in records:
        kept.setdefault((record["pair_id"], record["method"]), record)
    return list(kept.values())


def _slice_batch(batch: dict[str, Any], count: int) -> dict[str, Any]:
    return {key: value[:count] for key, value in batch.items()}


def _render_pair(batch: dict[str, Any], row: int, pair_results: list[ScoredMap]) -> tuple[Any, str]:
    """Render the main map and, when present, the first BBM map of one pair side by side."""
    pixel_values = batch["pixel_values"][row].detach().float().cpu().numpy()
    boxes = [tuple(box) for box in batch["boxes"][row]] if "boxes" in batch else []
    shown = [item for item in pair_results if item.method == MAIN_METHOD]
    shown += [item for item in pair_results if item.method.startswith("bbm/")][:1]
    panels = [render_overlay(pixel_values, item.image_map, item.image_mask, boxes) for item in shown]
    scores = [f"{item.method}: mIoU {item.record['zero_all/miou']:.2f} CNR {item.record['zero_all/cnr']:.2f}" for item in shown]
    header = f"{batch['pair_ids'][row]} | {batch['findings'][row]} | {batch['phrases'][row]}"
    caption = f"{header} | " + " vs ".join(scores)
    # Each method takes two panels (image, map with boxes and mask outline), left to right.
    lines = [header, "  |  ".join(f"{score} (image, map)" for score in scores)]
    return add_caption(side_by_side(panels), lines), caption


def _render_word_maps(batch: dict[str, Any], row: int, item: ScoredMap) -> tuple[Any, str]:
    """Render the image, the main map, then one heat map per word token of the phrase."""
    pixel_values = batch["pixel_values"][row].detach().float().cpu().numpy()
    caption = f"{batch['pair_ids'][row]} | {batch['phrases'][row]} | image, main map, then one map per word token"
    return add_caption(render_word_maps(pixel_values, item.image_map, item.word_maps), [caption]), caption


def _flatten_for_logging(summary: dict[str, Any], stage: str) -> dict[str, float]:
    """Metric keys ``<stage>/grounding/<method>/<metric>`` (weighted average) and per finding."""
    values: dict[str, float] = {}
    for method, method_summary in summary["methods"].items():
        for name, value in method_summary["overall"].items():
            if isinstance(value, (int, float)) and np.isfinite(value):
                values[f"{stage}/grounding/{method}/{name}"] = float(value)
        if method != MAIN_METHOD:
            continue
        for finding, finding_values in method_summary["per_finding"].items():
            for name in HEADLINE_METRICS:
                value = finding_values.get(name)
                if value is not None and np.isfinite(value):
                    values[f"{stage}/grounding/{finding.replace(' ', '_')}/{name}"] = float(value)
    return values
