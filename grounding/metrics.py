"""Phrase grounding metrics of one (image, phrase) pair at image resolution.

Two metric conventions are available:

- `gmm_miou` (Generate to Ground, MIDL 2025): mIoU is the mean of the foreground and
  background Jaccard indices between a binary mask and the ground truth; CNR compares the
  map inside and outside the union of the boxes.
- `multi_threshold` (BioViL, Boecking et al., ECCV 2022, and later MS-CXR work): mIoU is the
  foreground IoU of the min-max map thresholded at 0.1, 0.2, ..., 0.5, averaged. CNR is
  computed per box, inside that box against outside all boxes, and averaged over boxes.

Top-1 and AUC-ROC are the same in both. When a binary mask is empty, the reference code of
Generate to Ground sets every metric of the pair to 0, even the threshold-free ones;
`score_pair` reports that convention (`zero_all`) next to one that keeps the
threshold-free metrics (`keep_threshold_free`).

A ground truth without pixels (e.g. every box fell outside the crop) is scored, not
rejected, so that aggregates count it: AUC-ROC and CNR are NaN, Top-1 is 0, mIoU follows
its definition, and the pair's issues contain `empty_gt`.
"""

import logging
import math
from dataclasses import dataclass, replace
from enum import Enum, unique

import numpy as np

logger = logging.getLogger(__name__)

# Thresholds of the multi-threshold convention, on the min-max map in [0, 1].
IOU_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5)

METRIC_NAMES = ("miou", "cnr", "cnr_signed", "top1", "auc_roc")


@unique
class MetricConvention(str, Enum):
    """Definitions of mIoU and CNR behind a result."""

    GMM_MIOU = "gmm_miou"
    MULTI_THRESHOLD = "multi_threshold"

    @property
    def description(self) -> str:
        """One-sentence definition of mIoU and CNR under this convention, for table captions."""
        return {
            MetricConvention.GMM_MIOU: (
                "mIoU is the mean of the foreground and background Jaccard indices of the GMM mask, "
                "and CNR compares the map inside and outside the union of the boxes."
            ),
            MetricConvention.MULTI_THRESHOLD: (
                "mIoU is the foreground IoU of the min-max map thresholded at 0.1, 0.2, 0.3, 0.4 and 0.5, "
                "averaged, and CNR is computed per box against outside all boxes, then averaged."
            ),
        }[self]


@unique
class EmptyMaskPolicy(str, Enum):
    """Treatment of a pair's metrics when its binary mask is empty."""

    ZERO_ALL = "zero_all"
    KEEP_THRESHOLD_FREE = "keep_threshold_free"


@dataclass(frozen=True)
class PairMetrics:
    """Metrics of one pair under one convention and one empty-mask policy.

    Attributes:
        miou: mIoU in [0, 1] (definition set by `convention`).
        cnr: Contrast-to-noise ratio with the absolute value, as Generate to Ground writes it.
        cnr_signed: The same without the absolute value, negative when the map is darker
            inside the ground truth. The averages of Generate to Ground come from this value.
        top1: 1.0 when the map's argmax lies in the ground truth, else 0.0.
        auc_roc: Area under the ROC curve of the map's values against the ground truth.
        mask_empty: Whether the pair's binary mask was empty.
        issues: Flags of the pair's degenerate inputs and undefined values, in this order
            when present: `empty_gt` (the ground truth has no pixel), `non_finite_map`,
            `constant_map`, `auc_single_class` (AUC-ROC is NaN), `cnr_undefined` (CNR is
            NaN) and `mask_empty`.
        convention: Definitions used for mIoU and CNR.
        empty_mask_policy: Policy applied when `mask_empty`.
    """

    miou: float
    cnr: float
    cnr_signed: float
    top1: float
    auc_roc: float
    mask_empty: bool
    issues: tuple[str, ...]
    convention: MetricConvention
    empty_mask_policy: EmptyMaskPolicy

    def values(self) -> dict[str, float]:
        """Return the metric values keyed by `METRIC_NAMES`."""
        return {name: getattr(self, name) for name in METRIC_NAMES}


@dataclass(frozen=True)
class PairScores:
    """The metrics of one pair under both empty-mask policies."""

    zero_all: PairMetrics
    keep_threshold_free: PairMetrics

    def as_record(self) -> dict[str, float | bool | str]:
        """Flatten to `{"<policy>/<metric>": value}` plus the convention and mask state."""
        record: dict[str, float | bool | str] = {
            "convention": self.zero_all.convention.value,
            "mask_empty": self.zero_all.mask_empty,
            "issues": ";".join(self.keep_threshold_free.issues),
        }
        for metrics in (self.zero_all, self.keep_threshold_free):
            for name, value in metrics.values().items():
                record[f"{metrics.empty_mask_policy.value}/{name}"] = value
        return record


def _safe_ratio(numerator: int, denominator: int) -> float:
    # Both sets empty means they agree completely, so 0/0 counts as a perfect overlap.
    return 1.0 if denominator == 0 else numerator / denominator


def jaccard_index(prediction: np.ndarray, target: np.ndarray) -> float:
    """Compute |A and B| / |A or B| of two boolean arrays; two empty sets give 1.0."""
    intersection = int(np.count_nonzero(prediction & target))
    union = int(np.count_nonzero(prediction | target))
    return _safe_ratio(intersection, union)


def foreground_background_miou(mask: np.ndarray, gt_mask: np.ndarray) -> float:
    """Average the Jaccard indices of the foregrounds and of the backgrounds.

    Args:
        mask: Boolean predicted mask [H, W].
        gt_mask: Boolean ground-truth mask [H, W].

    Returns:
        (IoU(mask, gt) + IoU(not mask, not gt)) / 2 in [0, 1]. A pair of empty sets counts
        as IoU 1.0, which happens for the backgrounds when both masks cover the image and
        for the foregrounds when both are empty.
    """
    return (jaccard_index(mask, gt_mask) + jaccard_index(~mask, ~gt_mask)) / 2.0


def multi_threshold_iou(normalized_map: np.ndarray, gt_mask: np.ndarray) -> float:
    """Average the foreground IoU of `map > t` for t in `IOU_THRESHOLDS`.

    Args:
        normalized_map: Min-max map [H, W] in [0, 1].
        gt_mask: Boolean ground-truth mask [H, W].

    Returns:
        The mean foreground IoU in [0, 1]. A threshold with neither a pixel above it nor a
        ground-truth pixel scores 1.0, as in `jaccard_index`, so an empty ground truth gives
        0.0 for a min-max map with any contrast and 1.0 for a constant map.
    """
    scores = [jaccard_index(normalized_map > threshold, gt_mask) for threshold in IOU_THRESHOLDS]
    return float(np.mean(scores))


def contrast_to_noise(activation_map: np.ndarray, inside: np.ndarray, outside: np.ndarray) -> float:
    """Compute the signed CNR (mean_in - mean_out) / sqrt(var_in + var_out).

    Variances are population variances (ddof=0).

    Args:
        activation_map: Map [H, W].
        inside: Boolean mask [H, W] of the region of interest.
        outside: Boolean mask [H, W] of the reference region.

    Returns:
        The signed CNR, or NaN when either region is empty or both variances are 0.
    """
    values_in = activation_map[inside]
    values_out = activation_map[outside]
    if values_in.size == 0 or values_out.size == 0:
        return float("nan")

    noise = math.sqrt(float(values_in.var()) + float(values_out.var()))
    if noise == 0.0:
        return float("nan")
    return (float(values_in.mean()) - float(values_out.mean())) / noise


def top1_hit(activation_map: np.ndarray, gt_mask: np.ndarray) -> float:
    """Return 1.0 when the map's first argmax (row-major, as `np.argmax`) is in the mask."""
    return float(gt_mask.ravel()[int(np.argmax(activation_map))])


def auc_roc(activation_map: np.ndarray, gt_mask: np.ndarray) -> float:
    """Compute the area under the ROC curve of the map's values against the mask.

    The area is the Mann-Whitney U statistic with average ranks for ties, which equals
    `sklearn.metrics.roc_auc_score(gt_mask.ravel(), activation_map.ravel())` (a test checks
    this) at about a quarter of its cost on a 512x512 pair, because only the values are
    sorted.

    Returns:
        The AUC in [0, 1], or NaN when the mask has a single class (all or no pixels).
    """
    labels = gt_mask.ravel()
    values = activation_map.ravel()
    positives = int(np.count_nonzero(labels))
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        return float("nan")

    # A value's tied run occupies sorted indices [left, right), so its average 1-based rank
    # is (left + right + 1) / 2.
    sorted_values = np.sort(values)
    positive_values = values[labels]
    left = np.searchsorted(sorted_values, positive_values, side="left")
    right = np.searchsorted(sorted_values, positive_values, side="right")
    rank_sum = float((left + right + 1).sum()) / 2.0
    return (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


def _check_inputs(
    activation_map: np.ndarray, gt_mask: np.ndarray, mask: np.ndarray | None, box_masks: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    activation_map = np.asarray(activation_map, dtype=np.float64)
    gt_mask = np.asarray(gt_mask)
    if activation_map.ndim != 2:
        raise ValueError(f"activation_map must be 2-D [H, W], got shape {activation_map.shape}.")
    if gt_mask.shape != activation_map.shape:
        raise ValueError(
            f"gt_mask shape {gt_mask.shape} differs from activation_map shape {activation_map.shape}; "
            "upsample the map to the image size first."
        )
    gt_mask = gt_mask.astype(bool)

    if mask is not None:
        mask = np.asarray(mask).astype(bool)
        if mask.shape != gt_mask.shape:
            raise ValueError(f"mask shape {mask.shape} differs from gt_mask shape {gt_mask.shape}.")
    if box_masks is not None:
        box_masks = np.asarray(box_masks).astype(bool)
        if box_masks.ndim != 3 or box_masks.shape[1:] != gt_mask.shape or box_masks.shape[0] == 0:
            raise ValueError(
                f"box_masks must be [n_boxes, H, W] with n_boxes >= 1 and [H, W] = {gt_mask.shape}, "
                f"got shape {box_masks.shape}."
            )
    return activation_map, gt_mask, mask, box_masks


def rasterize_boxes(boxes: list[tuple[float, float, float, float]], size: tuple[int, int]) -> np.ndarray:
    """Rasterize boxes given in pixel coordinates of the (cropped) image.

    A pixel belongs to a box when its centre (column + 0.5, row + 0.5) lies in
    [x, x + w) x [y, y + h). Parts of a box outside the image are cut off.

    Args:
        boxes: Boxes `(x, y, w, h)` in pixels.
        size: Image (height, width).

    Returns:
        Boolean array [n_boxes, height, width].

    Raises:
        ValueError: If a box has a negative or non-finite size.
    """
    height, width = size
    rows = np.arange(height) + 0.5
    columns = np.arange(width) + 0.5
    masks = np.zeros((len(boxes), height, width), bool)
    for index, box in enumerate(boxes):
        x, y, box_width, box_height = (float(value) for value in box)
        if not all(math.isfinite(value) for value in (x, y, box_width, box_height)) or box_width < 0 or box_height < 0:
            raise ValueError(f"Box {index} {box} is invalid; expected finite (x, y, w, h) with w, h >= 0.")
        in_rows = (rows >= y) & (rows < y + box_height)
        in_columns = (columns >= x) & (columns < x + box_width)
        masks[index] = in_rows[:, None] & in_columns[None, :]
    return masks


def _both_policies(metrics_kept: PairMetrics) -> PairScores:
    # The reference code of Generate to Ground zeroes every metric of a pair with an empty mask.
    zeroed = replace(metrics_kept, empty_mask_policy=EmptyMaskPolicy.ZERO_ALL)
    if metrics_kept.mask_empty:
        zeroed = replace(zeroed, miou=0.0, cnr=0.0, cnr_signed=0.0, top1=0.0, auc_roc=0.0)
    return PairScores(zero_all=zeroed, keep_threshold_free=metrics_kept)


def _gmm_miou_and_cnr(
    activation_map: np.ndarray, gt_mask: np.ndarray, mask: np.ndarray | None
) -> tuple[float, float, float, bool]:
    # Returns mIoU, CNR, signed CNR and whether the mask is empty.
    if mask is None:
        raise ValueError("score_pair needs the binary mask for the gmm_miou convention; pass mask=.")
    mask_empty = not bool(mask.any())
    miou = foreground_background_miou(mask, gt_mask)
    cnr_signed = contrast_to_noise(activation_map, gt_mask, ~gt_mask)
    return miou, abs(cnr_signed), cnr_signed, mask_empty


def _multi_threshold_miou_and_cnr(
    activation_map: np.ndarray, gt_mask: np.ndarray, box_masks: np.ndarray | None, constant_map: bool
) -> tuple[float, float, float]:
    # Returns mIoU, CNR and signed CNR.
    normalized = activation_map - activation_map.min()
    if not constant_map:
        normalized = normalized / normalized.max()
    miou = multi_threshold_iou(normalized, gt_mask)
    boxes = box_masks if box_masks is not None else gt_mask[None]
    outside_all = ~boxes.any(axis=0)

    # Each box against everything outside all boxes; the absolute value is taken per box.
    per_box = np.array([contrast_to_noise(activation_map, box, outside_all) for box in boxes])
    defined = per_box[~np.isnan(per_box)]
    cnr_signed = float(defined.mean()) if defined.size else float("nan")
    cnr = float(np.abs(defined).mean()) if defined.size else float("nan")
    return miou, cnr, cnr_signed


def score_pair(
    activation_map: np.ndarray,
    gt_mask: np.ndarray,
    mask: np.ndarray | None = None,
    convention: MetricConvention = MetricConvention.GMM_MIOU,
    box_masks: np.ndarray | None = None,
) -> PairScores:
    """Score one pair's map under both empty-mask policies.

    An empty `gt_mask` (no pixel, e.g. every box fell outside the crop) is scored like a
    single-class ground truth and flagged `empty_gt`: AUC-ROC is NaN, CNR is NaN because
    nothing lies inside, and Top-1 is 0 because no argmax can lie inside. mIoU follows its
    definition with 0/0 = 1 (see `jaccard_index`). Under `gmm_miou` an empty gt gives
    (1 + 1) / 2 = 1.0 for an empty mask and (0 + |not mask| / (H * W)) / 2 otherwise, and
    `zero_all` still zeroes every metric of an empty mask. Under `multi_threshold` it gives
    0.0 for a map with any contrast and 1.0 for a constant map.

    Args:
        activation_map: Map [H, W] at image resolution, normally the upsampled min-max map
            in [0, 1]. CNR, Top-1 and AUC are invariant to a positive affine rescaling.
        gt_mask: Boolean ground truth [H, W], the union of the pair's boxes; may be empty.
        mask: Boolean binary mask [H, W] of the map (e.g. the upsampled GMM mask); needed
            for `gmm_miou`, ignored by `multi_threshold`.
        convention: Definitions of mIoU and CNR.
        box_masks: Boolean [n_boxes, H, W], one mask per box, for the per-box CNR of
            `multi_threshold`; without it the whole ground truth counts as one box.

    Returns:
        The metrics with every metric zeroed for an empty mask (`zero_all`, the paper's
        reference) and with the threshold-free metrics kept (`keep_threshold_free`).

    Raises:
        ValueError: On mismatched shapes, an unknown convention, or a missing `mask` under
            `gmm_miou`.
    """
    convention = MetricConvention(convention)
    # The AUC sorts the map in its own float dtype, because sorting float32 takes about half
    # the time of float64; the other metrics use float64.
    sort_map = np.asarray(activation_map)
    if not np.issubdtype(sort_map.dtype, np.floating):
        sort_map = sort_map.astype(np.float64)
    activation_map, gt_mask, mask, box_masks = _check_inputs(activation_map, gt_mask, mask, box_masks)
    gt_empty = not bool(gt_mask.any())
    issues: list[str] = ["empty_gt"] if gt_empty else []

    # A NaN or infinite map has no defined metric; the caller counts it instead of crashing.
    if not np.all(np.isfinite(activation_map)):
        nan = float("nan")
        mask_empty = mask is not None and not bool(mask.any())
        issues.append("non_finite_map")
        metrics_kept = PairMetrics(
            nan, nan, nan, nan, nan, mask_empty, tuple(issues), convention, EmptyMaskPolicy.KEEP_THRESHOLD_FREE
        )
        return _both_policies(metrics_kept)

    # Threshold-free metrics, shared by both conventions.
    constant_map = bool(activation_map.max() == activation_map.min())
    if gt_empty:
        # Every argmax misses an empty ground truth, so the tie-breaking of a constant map
        # cannot change the result.
        top1 = 0.0
    else:
        top1 = float("nan") if constant_map else top1_hit(activation_map, gt_mask)
    auc = auc_roc(sort_map, gt_mask)
    if constant_map:
        issues.append("constant_map")
    if math.isnan(auc):
        issues.append("auc_single_class")

    # mIoU and CNR as the convention defines them.
    if convention is MetricConvention.GMM_MIOU:
        miou, cnr, cnr_signed, mask_empty = _gmm_miou_and_cnr(activation_map, gt_mask, mask)
    else:
        miou, cnr, cnr_signed = _multi_threshold_miou_and_cnr(activation_map, gt_mask, box_masks, constant_map)
        mask_empty = False
    if math.isnan(cnr_signed):
        issues.append("cnr_undefined")
    if mask_empty:
        issues.append("mask_empty")

    metrics_kept = PairMetrics(
        miou=miou,
        cnr=cnr,
        cnr_signed=cnr_signed,
        top1=top1,
        auc_roc=auc,
        mask_empty=mask_empty,
        issues=tuple(issues),
        convention=convention,
        empty_mask_policy=EmptyMaskPolicy.KEEP_THRESHOLD_FREE,
    )
    return _both_policies(metrics_kept)
