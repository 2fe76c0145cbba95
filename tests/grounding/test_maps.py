"""Tests of the streaming accumulator and the map reductions, on synthetic probabilities."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from grounding.maps import (
    AttentionSummary,
    CaptureBlock,
    CapturePass,
    StreamingAttentionAccumulator,
    combined_map,
    image_bias_mean,
    layer_grid_size,
    layers_by_resolution,
    min_max_normalize,
    product_map,
    text_bias_mean,
)

LAYERS = ["down_blocks.0.attn2", "mid_block.attn2"]
LATENT_SIZE = (4, 4)
GRIDS = [(4, 4), (2, 2)]
NUM_PAIRS = 2
NUM_TOKENS = 5
NUM_STEPS = 4
TOKEN_SETS = [{"words": [1, 2], "end": [3]}, {"words": [2], "end": [4]}]


def _probs(generator: torch.Generator, rows: int, grid: tuple[int, int]) -> torch.Tensor:
    return torch.rand(rows, grid[0] * grid[1], NUM_TOKENS, generator=generator).softmax(-1)


def _upsample(maps: torch.Tensor) -> torch.Tensor:
    """[..., h_l, w_l] -> [..., 4, 4] by nearest neighbours."""
    leading = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:])
    return F.interpolate(flat, size=LATENT_SIZE, mode="nearest").reshape(*leading, *LATENT_SIZE)


def _accumulate(bbm: bool) -> tuple[StreamingAttentionAccumulator, torch.Tensor, torch.Tensor]:
    """Feed seeded maps for the steps 1..3 (windows 1 and 3 of 4 steps).

    Returns the accumulator and the fed maps, upsampled, as [P, T, L, N, 4, 4] (main, text).
    """
    accumulator = StreamingAttentionAccumulator(
        LAYERS,
        num_pairs=NUM_PAIRS,
        latent_size=LATENT_SIZE,
        num_inference_steps=NUM_STEPS,
        timestep_windows=[3, 1],
        main_window=3,
        pair_seeds=[5, 6],
        token_sets=TOKEN_SETS if bbm else None,
    )
    generator = torch.Generator().manual_seed(0)
    main = torch.zeros(NUM_PAIRS, NUM_STEPS, len(LAYERS), NUM_TOKENS, *LATENT_SIZE)
    text = torch.zeros_like(main)

    # The main run's steps 1 and 2 share a forward, as in a gt_cfg chunk. The text run's steps 1
    # and 2 follow, and the last forward has step 3 of both runs, as in the guided modes.
    forwards = [
        [CaptureBlock(CapturePass.MAIN, 1, 0), CaptureBlock(CapturePass.MAIN, 2, 2)],
        [CaptureBlock(CapturePass.TEXT, 1, 2)],
        [CaptureBlock(CapturePass.TEXT, 2, 0)],
        [CaptureBlock(CapturePass.MAIN, 3, 0), CaptureBlock(CapturePass.TEXT, 3, 2)],
    ]
    for blocks in forwards:
        if not bbm:
            blocks = [block for block in blocks if block.capture_pass == CapturePass.MAIN]
            if not blocks:
                continue
        accumulator.begin_capture(blocks)
        for position, grid in enumerate(GRIDS):
            probs = _probs(generator, len(blocks) * NUM_PAIRS, grid)
            accumulator.mark_called(position)
            accumulator.record(position, probs)
            for index, block in enumerate(blocks):
                fed = probs[index * NUM_PAIRS : (index + 1) * NUM_PAIRS].transpose(1, 2).unflatten(-1, grid)
                target = main if block.capture_pass == CapturePass.MAIN else text
                target[:, block.step_index, position] = _upsample(fed)
        accumulator.end_forward()
    return accumulator, main, text


def _min_max(values: torch.Tensor) -> torch.Tensor:
    return (values - values.min()) / (values.max() - values.min())


def test_layer_grid_size_finds_downsampling():
    assert layer_grid_size(64, (16, 16)) == (8, 8)
    assert layer_grid_size(128, (16, 32)) == (8, 16)
    assert layer_grid_size(64, (15, 15)) == (8, 8)
    assert layer_grid_size(256, (16, 16)) == (16, 16)


def test_layer_grid_size_rejects_mismatch():
    with pytest.raises(ValueError, match="does not fit"):
        layer_grid_size(50, (16, 16))


def test_min_max_normalize_range():
    normalized = min_max_normalize(torch.tensor([[2.0, 4.0], [3.0, 6.0]]))

    assert normalized.min().item() == 0.0
    assert normalized.max().item() == 1.0
    assert normalized[1, 0].item() == pytest.approx(0.25)


def test_min_max_normalize_constant_map():
    assert torch.equal(min_max_normalize(torch.full((3, 3), 0.7)), torch.zeros(3, 3))


def test_accumulator_sums_match_direct_means():
    accumulator, main, _ = _accumulate(bbm=False)
    summaries = accumulator.summaries()

    assert [summary.pair_seed for summary in summaries] == [5, 6]
    assert summaries[0].timestep_windows == (1, 3)
    assert [tuple(layer_sums.shape) for layer_sums in summaries[0].attention_sums] == [(2, 5, 4, 4), (2, 5, 2, 2)]
    for pair, summary in enumerate(summaries):
        cases = [(3, None, [0, 1], [1, 2]), (1, [1], [1], [4]), (3, ["mid_block.attn2", 0], [0, 1], [0, 3])]
        for window, layers, layer_index, tokens in cases:
            selected = main[pair, NUM_STEPS - window :][:, layer_index][:, :, tokens]
            expected = _min_max(selected.mean((0, 1, 2)))
            assert torch.allclose(combined_map(summary, tokens, window, layers), expected, atol=1e-6)
        expected_bias = main[pair, 1:, :, 0].mean((0, 1))
        assert torch.allclose(image_bias_mean(summary), expected_bias, atol=1e-6)


def test_accumulator_bbm_matches_direct_products():
    accumulator, main, text = _accumulate(bbm=True)
    summaries = accumulator.summaries()

    for pair, summary in enumerate(summaries):
        for name, tokens in TOKEN_SETS[pair].items():
            for window in (1, 3):
                steps = slice(NUM_STEPS - window, NUM_STEPS)
                products = main[pair, steps, :, :1] @ text[pair, steps][:, :, tokens]
                expected_product = _min_max(products.mean((0, 1, 2)))
                expected_text = text[pair, steps][:, :, tokens].mean((0, 1, 2))
                assert torch.allclose(product_map(summary, name, window), expected_product, atol=1e-6)
                assert torch.allclose(text_bias_mean(summary, name, window), expected_text, atol=1e-6)


def test_step_outside_windows_rejected():
    accumulator, _, _ = _accumulate(bbm=False)

    with pytest.raises(ValueError, match="Step 0 lies outside"):
        accumulator.begin_capture([CaptureBlock(CapturePass.MAIN, 0, 0)])


def test_text_before_main_raises():
    accumulator = StreamingAttentionAccumulator(
        LAYERS, NUM_PAIRS, LATENT_SIZE, NUM_STEPS, [2], 2, [0, 1], TOKEN_SETS
    )
    accumulator.begin_capture([CaptureBlock(CapturePass.TEXT, 3, 0)])

    with pytest.raises(RuntimeError, match="before the main run"):
        accumulator.record(0, _probs(torch.Generator().manual_seed(1), NUM_PAIRS, GRIDS[0]))


def test_unmatched_main_step_raises():
    accumulator = StreamingAttentionAccumulator(
        LAYERS, NUM_PAIRS, LATENT_SIZE, NUM_STEPS, [2], 2, [0, 1], TOKEN_SETS
    )
    accumulator.begin_capture([CaptureBlock(CapturePass.MAIN, 3, 0)])
    generator = torch.Generator().manual_seed(1)
    for position, grid in enumerate(GRIDS):
        accumulator.mark_called(position)
        accumulator.record(position, _probs(generator, NUM_PAIRS, grid))
    accumulator.end_forward()

    with pytest.raises(RuntimeError, match="never got the matching text-run step"):
        accumulator.summaries()


def test_summaries_before_capture_raise():
    accumulator = StreamingAttentionAccumulator(LAYERS, NUM_PAIRS, LATENT_SIZE, NUM_STEPS, [2], 2, [0, 1])

    with pytest.raises(RuntimeError, match="No attention was captured"):
        accumulator.summaries()


def test_bbm_rejects_non_square_latent():
    accumulator = StreamingAttentionAccumulator(
        LAYERS[:1], NUM_PAIRS, (4, 8), NUM_STEPS, [2], 2, [0, 1], TOKEN_SETS
    )
    generator = torch.Generator().manual_seed(2)
    accumulator.begin_capture([CaptureBlock(CapturePass.MAIN, 3, 0), CaptureBlock(CapturePass.TEXT, 3, 2)])

    with pytest.raises(ValueError, match="square latent"):
        accumulator.record(0, _probs(generator, 2 * NUM_PAIRS, (4, 8)))


@pytest.fixture(scope="module")
def summary() -> AttentionSummary:
    accumulator, _, _ = _accumulate(bbm=True)
    return accumulator.summaries()[0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tokens": [1], "window": 2}, "Window 2 was not accumulated"),
        ({"tokens": []}, "token selection is empty"),
        ({"tokens": [5]}, "Invalid token position 5"),
        ({"tokens": [True]}, "Invalid token position True"),
        ({"tokens": [1], "layers": []}, "layer selection is empty"),
        ({"tokens": [1], "layers": [2]}, "out of range"),
        ({"tokens": [1], "layers": ["up_blocks.0.attn2"]}, "was not captured"),
    ],
)
def test_combined_map_rejects_bad_selection(summary, kwargs, message):
    with pytest.raises(ValueError, match=message):
        combined_map(summary, **kwargs)


def test_product_map_rejects_unknown_selection(summary):
    with pytest.raises(ValueError, match="'lexical' was not given"):
        product_map(summary, "lexical")


def test_bbm_maps_need_text_run():
    accumulator, _, _ = _accumulate(bbm=False)
    plain = accumulator.summaries()[0]

    with pytest.raises(ValueError, match="no text run"):
        product_map(plain, "words")
    with pytest.raises(ValueError, match="no text run"):
        text_bias_mean(plain, "words")


def test_numpy_token_positions_accepted(summary):
    numpy_tokens = list(np.array([1, 2]))

    assert torch.equal(combined_map(summary, numpy_tokens), combined_map(summary, [1, 2]))


def test_sd15_layers_grouped_by_resolution(sd15_layout_unet, scheduler_config):
    from grounding.engine import GroundingConfig, GroundingEngine

    # At a 16x16 latent the four levels are 16, 8, 4 and 2 pixels wide.
    engine = GroundingEngine(sd15_layout_unet, scheduler_config, GroundingConfig(num_inference_steps=2, timestep_window=1))
    summary = engine.run(torch.zeros(1, 4, 16, 16), torch.randn(1, 12, 16), None, None, [0])[0]

    groups = layers_by_resolution(summary)

    # Forward order: down 0-5 (two layers per level), mid 6, up 7-15 (three per level).
    assert groups == {
        "res2": [6],
        "res4": [4, 5, 7, 8, 9],
        "res8": [2, 3, 10, 11, 12],
        "res16": [0, 1, 13, 14, 15],
    }
