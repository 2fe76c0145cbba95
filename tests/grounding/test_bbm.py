import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from grounding.bbm import BBMVariant, bias_similarity, bimodal_bias_merge, merge, multiply_biases
from grounding.masks import MapFlag


@pytest.mark.parametrize("variant", list(BBMVariant))
def test_merge_endpoints(variant: BBMVariant) -> None:
    rng = np.random.default_rng(0)
    p_comb = rng.random((8, 8))
    p_mult = rng.random((8, 8))

    np.testing.assert_allclose(merge(p_comb, p_mult, 0.0, variant), p_comb)
    np.testing.assert_allclose(merge(p_comb, p_mult, 1.0, variant), p_mult)


@pytest.mark.parametrize(
    ("variant", "expected"),
    [
        # Control point (0.8 + 0.4 + 0.32) / 2 = 0.76: 0.5 * 0.76 + 0.25 * 0.4 + 0.25 * 0.8.
        (BBMVariant.BEZIER, 0.68),
        (BBMVariant.LINEAR, 0.6),
        # Control point 0.32: 0.5 * 0.32 + 0.1 + 0.2.
        (BBMVariant.QUADRATIC, 0.46),
    ],
)
def test_merge_midpoint_hand_computed(variant: BBMVariant, expected: float) -> None:
    merged = merge(np.array([[0.4]]), np.array([[0.8]]), 0.5, variant)

    assert merged[0, 0] == pytest.approx(expected)


def test_merge_accepts_tensors_and_strings() -> None:
    merged = merge(torch.full((2, 2), 0.4), torch.full((2, 2), 0.8), 0.5, "linear")

    assert isinstance(merged, torch.Tensor)
    torch.testing.assert_close(merged, torch.full((2, 2), 0.6))


def test_merge_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="differs"):
        merge(np.zeros((2, 2)), np.zeros((3, 3)), 0.5)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        merge(np.zeros((2, 2)), np.zeros((2, 2)), 1.5)
    with pytest.raises(ValueError, match="not a valid BBMVariant"):
        merge(np.zeros((2, 2)), np.zeros((2, 2)), 0.5, "cubic")


def test_similarity_identical_maps_one() -> None:
    bias_map = np.random.default_rng(1).random((16, 16))

    assert bias_similarity(bias_map, bias_map * 3.0 + 2.0) == pytest.approx(1.0)


def test_similarity_inverted_maps_clipped() -> None:
    bias_map = np.random.default_rng(2).random((16, 16))

    assert bias_similarity(bias_map, -bias_map) == 0.0


def test_similarity_matches_skimage_on_uint8() -> None:
    rng = np.random.default_rng(3)
    image_bias = rng.random((64, 64))
    text_bias = image_bias + 0.5 * rng.random((64, 64))

    def to_uint8(values: np.ndarray) -> np.ndarray:
        return np.round((values - values.min()) / (values.max() - values.min()) * 255).astype(np.uint8)

    expected = structural_similarity(to_uint8(image_bias), to_uint8(text_bias), data_range=255)

    assert 0.0 < expected < 1.0
    assert bias_similarity(torch.from_numpy(image_bias), text_bias) == pytest.approx(expected)


def test_similarity_rejects_bad_maps() -> None:
    with pytest.raises(ValueError, match=">= 7"):
        bias_similarity(np.zeros((6, 6)), np.zeros((6, 6)))
    with pytest.raises(ValueError, match="differs"):
        bias_similarity(np.eye(8), np.eye(9))
    nan_map = np.eye(8)
    nan_map[0, 0] = np.nan
    with pytest.raises(ValueError, match="p_txt_mean contains NaN"):
        bias_similarity(np.eye(8), nan_map)


def test_multiply_biases_matches_loop() -> None:
    generator = torch.Generator().manual_seed(0)
    p_img = torch.rand(3, 2, 1, 5, 5, generator=generator)
    p_txt = torch.rand(3, 2, 4, 5, 5, generator=generator)

    expected = torch.zeros(5, 5)
    for t in range(3):
        for layer in range(2):
            for k in range(4):
                expected += p_img[t, layer, 0] @ p_txt[t, layer, k]
    expected /= 3 * 2 * 4

    torch.testing.assert_close(multiply_biases(p_img, p_txt, normalize=False), expected)
    normalized = multiply_biases(p_img, p_txt)
    assert float(normalized.min()) == 0.0
    assert float(normalized.max()) == pytest.approx(1.0)


def test_multiply_biases_identity_image_bias() -> None:
    p_txt = torch.arange(16, dtype=torch.float32).reshape(1, 4, 4)

    product = multiply_biases(torch.eye(4)[None], p_txt, normalize=False)

    torch.testing.assert_close(product, p_txt[0])


def test_multiply_biases_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="square"):
        multiply_biases(torch.zeros(4, 5), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="square"):
        multiply_biases(torch.zeros(4, 4), torch.zeros(5, 5))
    with pytest.raises(ValueError, match="broadcast"):
        multiply_biases(torch.zeros(2, 4, 4), torch.zeros(3, 4, 4))


def test_bimodal_bias_merge_normalized() -> None:
    rng = np.random.default_rng(4)
    p_comb = rng.random((16, 16))
    p_mult = rng.random((16, 16))
    bias_map = rng.random((16, 16))

    result = bimodal_bias_merge(p_comb, p_mult, bias_map, bias_map)

    assert result.similarity == pytest.approx(1.0)
    assert result.variant is BBMVariant.BEZIER
    assert result.flag is MapFlag.OK
    np.testing.assert_allclose(result.merged, (p_mult - p_mult.min()) / (p_mult.max() - p_mult.min()), atol=1e-6)
