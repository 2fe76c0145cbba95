"""Bimodal Bias Merging (BBM): blend a phrase's activation map with its image-text bias map.

Generate to Ground (MIDL 2025) merges the activation map `P_comb` with `P_mult`, the matrix
product of the image bias (start-token maps of the ground-truth pass) and the text bias
(selected-token maps of a sampling pass from Gaussian noise). The merge weight `s` is the
SSIM between the mean image bias and the mean text bias, so the text bias counts more when
the two agree.
"""

import logging
from dataclasses import dataclass
from enum import Enum, unique

import numpy as np
import torch
from skimage.metrics import structural_similarity

from grounding.masks import MapFlag, min_max_normalize

logger = logging.getLogger(__name__)

# Side of skimage's default SSIM window, so the smallest map size SSIM accepts.
SSIM_WINDOW = 7


@unique
class BBMVariant(str, Enum):
    """Interpolation between `P_comb` (s = 0) and `P_mult` (s = 1).

    - `bezier` (mixture Bezier, the main variant):
      2(1-s)s (P_mult + P_comb + P_mult*P_comb)/2 + (1-s)^2 P_comb + s^2 P_mult
    - `linear`: s P_mult + (1-s) P_comb
    - `quadratic`: 2(1-s)s (P_mult*P_comb) + (1-s)^2 P_comb + s^2 P_mult

    `*` is the elementwise product.
    """

    BEZIER = "bezier"
    LINEAR = "linear"
    QUADRATIC = "quadratic"


@dataclass(frozen=True)
class BBMResult:
    """A merged map and the weight that produced it.

    Attributes:
        merged: Min-max map [h, w] in [0, 1] (zeros when the merge is constant).
        similarity: The merge weight s in [0, 1].
        variant: Interpolation used.
        flag: `ok`, or why `merged` is all zeros.
    """

    merged: np.ndarray
    similarity: float
    variant: BBMVariant
    flag: MapFlag


def merge(
    p_comb: np.ndarray | torch.Tensor,
    p_mult: np.ndarray | torch.Tensor,
    s: float,
    variant: BBMVariant = BBMVariant.BEZIER,
) -> np.ndarray | torch.Tensor:
    """Interpolate between the activation map and the bias product.

    Args:
        p_comb: Activation map [..., h, w], min-max normalized.
        p_mult: Bias product of the same shape, min-max normalized.
        s: Merge weight in [0, 1]; 0 returns `p_comb` and 1 returns `p_mult`.
        variant: Interpolation formula (see `BBMVariant`).

    Returns:
        The merged map, of the inputs' type and shape. It is not renormalized, so the
        `bezier` variant can exceed 1 where both inputs are high.

    Raises:
        ValueError: If the shapes differ, `s` is outside [0, 1] or the variant is unknown.
    """
    variant = BBMVariant(variant)
    if tuple(p_comb.shape) != tuple(p_mult.shape):
        raise ValueError(f"p_comb shape {tuple(p_comb.shape)} differs from p_mult shape {tuple(p_mult.shape)}.")
    if not 0.0 <= s <= 1.0:
        raise ValueError(f"Merge weight s must be in [0, 1], got {s}.")

    if variant is BBMVariant.LINEAR:
        return s * p_mult + (1.0 - s) * p_comb

    product = p_mult * p_comb
    if variant is BBMVariant.QUADRATIC:
        control_point = product
    else:
        control_point = (p_mult + p_comb + product) / 2.0
    return 2.0 * (1.0 - s) * s * control_point + (1.0 - s) ** 2 * p_comb + s**2 * p_mult


def _to_uint8_image(bias_map: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    array = bias_map.detach().cpu().numpy() if isinstance(bias_map, torch.Tensor) else np.asarray(bias_map)
    if array.ndim != 2 or min(array.shape) < SSIM_WINDOW:
        raise ValueError(f"{name} must be 2-D with both sides >= {SSIM_WINDOW} for SSIM, got shape {array.shape}.")

    normalized = min_max_normalize(array)
    if normalized.flag is MapFlag.NON_FINITE_MAP:
        raise ValueError(f"{name} contains NaN or infinite values; check the captured attention maps.")
    # NOTE: rounds to the nearest level; truncation (`astype` alone) would shift s slightly.
    return np.round(normalized.values * 255.0).astype(np.uint8)


def bias_similarity(p_img_mean: np.ndarray | torch.Tensor, p_txt_mean: np.ndarray | torch.Tensor) -> float:
    """Compute the merge weight s as the SSIM of the two mean bias maps.

    Each map is min-max scaled to uint8 (0..255, a constant map becomes all zeros), then
    compared with `skimage.metrics.structural_similarity` at its defaults (7x7 uniform
    window) and `data_range=255`. Negative SSIM is clipped to 0.

    Args:
        p_img_mean: Image bias averaged over timesteps and layers, [h, w].
        p_txt_mean: Text bias averaged over timesteps, layers and tokens, [h, w].

    Returns:
        s in [0, 1].

    Raises:
        ValueError: If a map is not 2-D, is smaller than 7x7, has non-finite values, or the
            shapes differ.
    """
    image_bias = _to_uint8_image(p_img_mean, "p_img_mean")
    text_bias = _to_uint8_image(p_txt_mean, "p_txt_mean")
    if image_bias.shape != text_bias.shape:
        raise ValueError(f"p_img_mean shape {image_bias.shape} differs from p_txt_mean shape {text_bias.shape}.")

    similarity = structural_similarity(image_bias, text_bias, data_range=255)
    return max(float(similarity), 0.0)


def multiply_biases(p_img: torch.Tensor, p_txt: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Average the matrix products `p_img[t, l] @ p_txt[t, l, k]` over all leading indices.

    This is the reference computation of `P_mult` over stored maps. The leading dimensions
    broadcast as in `torch.matmul`, so `p_img` [T, L, 1, h, h] pairs each image bias with
    every selected token of `p_txt` [T, L, K, h, h].

    Args:
        p_img: Image bias maps [..., h, h] (start-token attention).
        p_txt: Text bias maps [..., h, h] (selected-token attention).
        normalize: Min-max normalize the mean product to [0, 1] (a constant product gives
            zeros).

    Returns:
        float32 tensor [h, h] on the inputs' device.

    Raises:
        ValueError: If the maps are not square, their sizes differ or their leading
            dimensions do not broadcast.
    """
    if p_img.ndim < 2 or p_txt.ndim < 2 or p_img.shape[-1] != p_img.shape[-2] or p_txt.shape[-2:] != p_img.shape[-2:]:
        raise ValueError(
            "multiply_biases needs square maps of one size [..., h, h], got "
            f"p_img {tuple(p_img.shape)} and p_txt {tuple(p_txt.shape)}."
        )
    try:
        leading = torch.broadcast_shapes(p_img.shape[:-2], p_txt.shape[:-2])
    except RuntimeError as error:
        raise ValueError(
            f"Leading dimensions of p_img {tuple(p_img.shape)} and p_txt {tuple(p_txt.shape)} do not broadcast."
        ) from error

    products = torch.matmul(p_img.float(), p_txt.float())
    mean_product = products.reshape(-1, *products.shape[-2:]).mean(dim=0)
    logger.debug("Averaged %d bias products over leading shape %s.", max(1, int(np.prod(leading))), tuple(leading))
    if not normalize:
        return mean_product

    low = mean_product.min()
    value_range = mean_product.max() - low
    if value_range == 0:
        return torch.zeros_like(mean_product)
    return (mean_product - low) / value_range


def bimodal_bias_merge(
    p_comb: np.ndarray,
    p_mult: np.ndarray,
    p_img_mean: np.ndarray,
    p_txt_mean: np.ndarray,
    variant: BBMVariant = BBMVariant.BEZIER,
) -> BBMResult:
    """Merge an activation map with the bias product, weighted by the biases' SSIM.

    Args:
        p_comb: Min-max activation map [h, w].
        p_mult: Min-max bias product [h, w] (see `multiply_biases`).
        p_img_mean: Mean image bias [h, w].
        p_txt_mean: Mean text bias [h, w].
        variant: Interpolation formula.

    Returns:
        The merged map min-max normalized again, so that masks and metrics see [0, 1] as
        for `P_comb`, and the weight s.

    Raises:
        ValueError: As `merge` and `bias_similarity`.
    """
    similarity = bias_similarity(p_img_mean, p_txt_mean)
    merged = merge(np.asarray(p_comb, np.float64), np.asarray(p_mult, np.float64), similarity, variant)
    normalized = min_max_normalize(merged)
    return BBMResult(normalized.values, similarity, BBMVariant(variant), normalized.flag)
