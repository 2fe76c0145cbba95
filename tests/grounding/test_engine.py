"""Tests of the grounding engine against a straightforward reference that keeps every map."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from diffusers.models.attention_processor import AttnProcessor2_0

from grounding.bbm import BBMVariant, bimodal_bias_merge
from grounding.capture import list_cross_attention_layers
from grounding.engine import (
    GroundingConfig,
    GroundingEngine,
    NoiseStream,
    SamplingMode,
    draw_noise,
    pair_seed_from_id,
)
from grounding.maps import combined_map, image_bias_mean, product_map, text_bias_mean

NUM_STEPS = 6
MAIN_WINDOW = 4
EXTRA_WINDOWS = [6, 2]
PAIR_SEEDS = [11, 7]
TOKEN_SETS = [
    {"lexical": [1, 3], "all_words": [1, 2, 3, 4], "start": [0], "end": [5]},
    {"lexical": [2], "all_words": [1, 2, 3], "start": [0], "end": [4]},
]
LAYER_SUBSETS = [None, [0, 3, 6], [2]]


def _config(sampling_mode: SamplingMode | str, **overrides: object) -> GroundingConfig:
    settings = {
        "mode": sampling_mode,
        "num_inference_steps": NUM_STEPS,
        "guidance_scale": 7.5,
        "timestep_window": MAIN_WINDOW,
        "extra_timestep_windows": list(EXTRA_WINDOWS),
        "seed": 3,
        "steps_per_forward": 4,
        **overrides,
    }
    return GroundingConfig(**settings)


@pytest.fixture(scope="module")
def inputs(num_tokens, cross_attention_dim):
    generator = torch.Generator().manual_seed(5)
    latents = torch.randn(2, 4, 16, 16, generator=generator)
    encoder_hidden_states = torch.randn(2, num_tokens, cross_attention_dim, generator=generator)
    uncond_hidden_states = torch.randn(1, num_tokens, cross_attention_dim, generator=generator)
    return latents, encoder_hidden_states, uncond_hidden_states


class _KeepEveryMap:
    """Reference processor: the original output, plus every head-averaged map upsampled."""

    def __init__(self, original, maps: list, latent_size: tuple[int, int]) -> None:
        self.original = original
        self.maps = maps
        self.latent_size = latent_size
        self.rows: list[int] = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        head_dim = query.shape[-1] // attn.heads
        query = query.unflatten(-1, (attn.heads, head_dim)).transpose(1, 2)
        key = key.unflatten(-1, (attn.heads, head_dim)).transpose(1, 2)
        probs = (query @ key.transpose(-1, -2) * head_dim**-0.5).softmax(-1).mean(1)

        # [rows, Q, N] -> [rows, N, h_l, w_l] -> nearest upsampling to the latent grid.
        side = int(probs.shape[1] ** 0.5)
        layer_maps = probs[self.rows].transpose(1, 2).unflatten(-1, (side, side))
        self.maps.append(F.interpolate(layer_maps, size=self.latent_size, mode="nearest"))
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask)


def _reference_run(unet, scheduler_config, config, latent, cond, uncond, pair_seed, text_run=False):
    """Sample one pair step by step with a full CFG batch; return maps [T, L, N, h, w]."""
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(config.num_inference_steps)
    modules = dict(unet.named_modules())
    names = list_cross_attention_layers(unet)
    originals = {name: modules[name].processor for name in names}
    step_maps: list = []
    processors = {name: _KeepEveryMap(originals[name], step_maps, latent.shape[-2:]) for name in names}
    mode = SamplingMode.CFG if text_run else config.mode
    guided = mode != SamplingMode.TEXT_ONLY

    def noise(stream, step=0):
        return draw_noise(config.seed, pair_seed, stream, step, latent.shape)[None]

    if text_run:
        sample = noise(NoiseStream.TEXT_RUN_START)
    elif mode == SamplingMode.GT1_CFG:
        sample = scheduler.add_noise(latent[None], noise(NoiseStream.FIRST_STEP), scheduler.timesteps[:1])
    else:
        sample = noise(NoiseStream.GAUSSIAN_START)

    all_maps = []
    try:
        for name in names:
            modules[name].set_processor(processors[name])
        with torch.no_grad():
            for step, timestep in enumerate(scheduler.timesteps):
                model_input = sample
                if mode == SamplingMode.GT_CFG:
                    model_input = scheduler.add_noise(latent[None], noise(NoiseStream.STEP, step), timestep[None])
                batch = torch.cat([model_input, model_input]) if guided else model_input
                states = torch.cat([uncond, cond[None]]) if guided else cond[None]
                for processor in processors.values():
                    processor.rows = [1] if guided else [0]
                step_maps.clear()
                prediction = unet(batch, timestep.expand(batch.shape[0]), states).sample
                all_maps.append(torch.cat(step_maps))
                if guided:
                    uncond_pred, cond_pred = prediction.chunk(2)
                    prediction = uncond_pred + config.guidance_scale * (cond_pred - uncond_pred)
                if mode != SamplingMode.GT_CFG:
                    sample = scheduler.step(prediction, timestep, sample).prev_sample
    finally:
        for name in names:
            modules[name].set_processor(originals[name])
    return torch.stack(all_maps)


def _min_max(values):
    return (values - values.min()) / (values.max() - values.min())


def _close(actual, expected):
    return (actual - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("mode", list(SamplingMode))
def test_engine_matches_reference(tiny_unet, scheduler_config, inputs, mode):
    latents, cond, uncond = inputs
    config = _config(mode, bimodal_bias_merging=True)
    summaries = GroundingEngine(tiny_unet, scheduler_config, config).run(
        latents, cond, uncond, TOKEN_SETS, PAIR_SEEDS
    )

    for pair, summary in enumerate(summaries):
        main = _reference_run(tiny_unet, scheduler_config, config, latents[pair], cond[pair], uncond, PAIR_SEEDS[pair])
        text = _reference_run(
            tiny_unet, scheduler_config, config, latents[pair], cond[pair], uncond, PAIR_SEEDS[pair], text_run=True
        )
        for window in [MAIN_WINDOW, *EXTRA_WINDOWS]:
            steps = slice(NUM_STEPS - window, NUM_STEPS)
            for layers in LAYER_SUBSETS:
                layer_index = list(range(7)) if layers is None else layers
                main_maps = main[steps][:, layer_index]
                text_maps = text[steps][:, layer_index]
                image_bias = main_maps[:, :, 0].mean((0, 1))
                assert _close(image_bias_mean(summary, window, layers), image_bias)

                for name, tokens in TOKEN_SETS[pair].items():
                    expected_comb = _min_max(main_maps[:, :, tokens].mean((0, 1, 2)))
                    expected_text = text_maps[:, :, tokens].mean((0, 1, 2))
                    products = main_maps[:, :, :1] @ text_maps[:, :, tokens]
                    expected_mult = _min_max(products.mean((0, 1, 2)))
                    assert _close(combined_map(summary, tokens, window, layers), expected_comb), (name, window, layers)
                    assert _close(text_bias_mean(summary, name, window, layers), expected_text), (name, window, layers)
                    assert _close(product_map(summary, name, window, layers), expected_mult), (name, window, layers)

        # Bimodal Bias Merging as the evaluation runs it: P_comb of the main window, biases and
        # product over all steps and layers, for every variant.
        for name, tokens in TOKEN_SETS[pair].items():
            reference_inputs = (
                _min_max(main[NUM_STEPS - MAIN_WINDOW :][:, :, tokens].mean((0, 1, 2))),
                _min_max((main[:, :, :1] @ text[:, :, tokens]).mean((0, 1, 2))),
                main[:, :, 0].mean((0, 1)),
                text[:, :, tokens].mean((0, 1, 2)),
            )
            engine_inputs = (
                combined_map(summary, tokens),
                product_map(summary, name, NUM_STEPS),
                image_bias_mean(summary, NUM_STEPS),
                text_bias_mean(summary, name, NUM_STEPS),
            )
            for variant in BBMVariant:
                expected = bimodal_bias_merge(*(values.numpy() for values in reference_inputs), variant)
                merged = bimodal_bias_merge(*(values.cpu().numpy() for values in engine_inputs), variant)
                assert merged.similarity == pytest.approx(expected.similarity, abs=1e-5), (name, variant)
                assert _close(torch.from_numpy(merged.merged), torch.from_numpy(expected.merged)), (name, variant)


def test_engine_window_default_is_main_window(tiny_unet, scheduler_config, inputs):
    latents, cond, uncond = inputs
    (summary,) = GroundingEngine(tiny_unet, scheduler_config, _config(SamplingMode.GT_CFG)).run(
        latents[:1], cond[:1], None, None, PAIR_SEEDS[:1]
    )

    assert summary.timestep_windows == (2, 4, 6)
    assert torch.equal(combined_map(summary, [1, 2]), combined_map(summary, [1, 2], window=MAIN_WINDOW))
    assert summary.product_sums is None
    assert summary.text_attention_sums is None


def test_window_sums_count_steps(tiny_unet, scheduler_config, inputs):
    latents, cond, uncond = inputs
    summaries = GroundingEngine(tiny_unet, scheduler_config, _config(SamplingMode.CFG)).run(
        latents, cond, uncond, None, PAIR_SEEDS
    )

    # Every map row sums to 1 over the tokens, so a window's sum over tokens is its step count.
    for summary in summaries:
        assert len(summary.attention_sums) == 7
        for layer_sums in summary.attention_sums:
            for window_position, window in enumerate(summary.timestep_windows):
                token_sums = layer_sums[window_position].sum(dim=0)
                assert torch.allclose(token_sums, torch.full_like(token_sums, float(window)), atol=1e-4)


def test_same_seed_same_maps(tiny_unet, scheduler_config, inputs):
    latents, cond, uncond = inputs
    engine = GroundingEngine(tiny_unet, scheduler_config, _config(SamplingMode.GT1_CFG))
    first = engine.run(latents, cond, uncond, None, PAIR_SEEDS)
    second = engine.run(latents, cond, uncond, None, PAIR_SEEDS)
    other_seed = GroundingEngine(tiny_unet, scheduler_config, _config(SamplingMode.GT1_CFG, seed=4)).run(
        latents, cond, uncond, None, PAIR_SEEDS
    )

    for pair in range(2):
        for layer in range(7):
            assert torch.equal(first[pair].attention_sums[layer], second[pair].attention_sums[layer])
    assert not torch.allclose(first[0].attention_sums[0], other_seed[0].attention_sums[0])


@pytest.mark.parametrize("mode", [SamplingMode.GT_CFG, SamplingMode.CFG])
def test_batch_composition_keeps_pair_maps(tiny_unet, scheduler_config, inputs, mode):
    latents, cond, uncond = inputs
    together = GroundingEngine(tiny_unet, scheduler_config, _config(mode, bimodal_bias_merging=True)).run(
        latents, cond, uncond, TOKEN_SETS, PAIR_SEEDS
    )
    alone_config = _config(mode, bimodal_bias_merging=True, steps_per_forward=1, pairs_per_forward=1)
    alone = GroundingEngine(tiny_unet, scheduler_config, alone_config).run(
        latents.flip(0), cond.flip(0), uncond, TOKEN_SETS[::-1], PAIR_SEEDS[::-1]
    )

    for pair in range(2):
        for layer in range(7):
            assert _close(alone[1 - pair].attention_sums[layer], together[pair].attention_sums[layer])
            assert _close(alone[1 - pair].text_attention_sums[layer], together[pair].text_attention_sums[layer])
            assert _close(alone[1 - pair].product_sums["lexical"][layer], together[pair].product_sums["lexical"][layer])


def test_gt_mode_runs_conditional_window_steps(tiny_unet, scheduler_config, inputs):
    latents, cond, uncond = inputs
    batch_sizes = []
    handle = tiny_unet.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    try:
        GroundingEngine(
            tiny_unet, scheduler_config, _config(SamplingMode.GT_CFG, extra_timestep_windows=[3])
        ).run(latents, cond, uncond, None, PAIR_SEEDS)
    finally:
        handle.remove()

    # Window 4 of 6 steps, 4 steps per forward, 2 pairs, no unconditional rows.
    assert batch_sizes == [8]


def test_layer_subset_config(tiny_unet, scheduler_config, inputs):
    latents, cond, uncond = inputs
    names = list_cross_attention_layers(tiny_unet)
    config = _config(SamplingMode.GT_CFG, layers=[-1, names[0]])
    (summary,) = GroundingEngine(tiny_unet, scheduler_config, config).run(
        latents[:1], cond[:1], None, None, PAIR_SEEDS[:1]
    )

    assert summary.layer_names == (names[0], names[-1])
    assert [tuple(layer_sums.shape) for layer_sums in summary.attention_sums] == [(3, 12, 16, 16), (3, 12, 16, 16)]


def test_replaced_processor_fails_run(tiny_unet, scheduler_config, inputs):
    latents, cond, uncond = inputs
    names = list_cross_attention_layers(tiny_unet)
    originals = tiny_unet.attn_processors
    victim = dict(tiny_unet.named_modules())[names[3]]
    handle = tiny_unet.register_forward_pre_hook(lambda module, args: victim.set_processor(AttnProcessor2_0()))
    try:
        with pytest.raises(RuntimeError, match="not captured"):
            GroundingEngine(tiny_unet, scheduler_config, _config(SamplingMode.GT_CFG)).run(
                latents, cond, uncond, None, PAIR_SEEDS
            )
    finally:
        handle.remove()

    assert all(tiny_unet.attn_processors[key] is originals[key] for key in originals)


def test_run_restores_training_mode(tiny_unet_factory, scheduler_config, inputs):
    latents, cond, uncond = inputs
    unet = tiny_unet_factory().train()
    GroundingEngine(unet, scheduler_config, _config(SamplingMode.TEXT_ONLY)).run(
        latents[:1], cond[:1], None, None, [0]
    )

    assert unet.training


def test_bfloat16_unet_runs(tiny_unet_factory, scheduler_config, inputs):
    latents, cond, uncond = inputs
    unet = tiny_unet_factory().to(torch.bfloat16)
    (summary,) = GroundingEngine(unet, scheduler_config, _config(SamplingMode.GT_CFG)).run(
        latents[:1], cond[:1], None, None, [0]
    )

    assert summary.attention_sums[0].dtype == torch.float32
    token_sums = summary.attention_sums[0][1].sum(dim=0)
    assert torch.allclose(token_sums, torch.full_like(token_sums, 4.0), atol=0.1)


def test_pair_seed_from_id_is_stable():
    assert pair_seed_from_id("pair-1") == pair_seed_from_id("pair-1")
    assert pair_seed_from_id("pair-1") != pair_seed_from_id("pair-2")
    assert 0 <= pair_seed_from_id("pair-1") < 2**63


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mode": "gt_plus"}, "Invalid sampling mode"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"timestep_window": 7}, "Timestep window 7"),
        ({"extra_timestep_windows": [0]}, "Timestep window 0"),
        ({"steps_per_forward": 0}, "steps_per_forward"),
        ({"pairs_per_forward": 0}, "pairs_per_forward"),
        ({"seed": -1}, "seed"),
    ],
)
def test_config_rejects_invalid_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(SamplingMode.GT_CFG, **overrides)


def test_config_accepts_mode_string():
    assert _config("cfg").mode is SamplingMode.CFG


def test_engine_rejects_unknown_layer(tiny_unet, scheduler_config):
    with pytest.raises(ValueError, match="out of range"):
        GroundingEngine(tiny_unet, scheduler_config, _config(SamplingMode.GT_CFG, layers=[9]))


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("latents_3d", r"\[B, C, h, w\]"),
        ("channels", "channels"),
        ("states_batch", "encoder_hidden_states"),
        ("seed_count", "pair seeds"),
        ("negative_seed", "Invalid pair seed"),
        ("missing_uncond", "needs uncond_hidden_states"),
        ("uncond_shape", "uncond_hidden_states must have shape"),
        ("missing_token_sets", "one token-set dict per pair"),
        ("token_names", "expected"),
        ("token_position", "outside"),
    ],
)
def test_run_rejects_bad_input(tiny_unet, scheduler_config, inputs, case, message):
    latents, cond, uncond = inputs
    token_sets = [dict(selections) for selections in TOKEN_SETS]
    seeds = list(PAIR_SEEDS)
    if case == "latents_3d":
        latents = latents[0]
    elif case == "channels":
        latents = latents[:, :3]
    elif case == "states_batch":
        cond = cond[:1]
    elif case == "seed_count":
        seeds = seeds[:1]
    elif case == "negative_seed":
        seeds[1] = -5
    elif case == "missing_uncond":
        uncond = None
    elif case == "uncond_shape":
        uncond = uncond[0]
    elif case == "missing_token_sets":
        token_sets = None
    elif case == "token_names":
        token_sets[1] = {"lexical": [1]}
    elif case == "token_position":
        token_sets[0]["lexical"] = [12]
    engine = GroundingEngine(tiny_unet, scheduler_config, _config(SamplingMode.CFG, bimodal_bias_merging=True))

    with pytest.raises(ValueError, match=message):
        engine.run(latents, cond, uncond, token_sets, seeds)


def test_empty_selection_fails_at_reduction(tiny_unet, scheduler_config, inputs, caplog):
    latents, cond, uncond = inputs
    token_sets = [{"lexical": []}, {"lexical": [1]}]
    engine = GroundingEngine(tiny_unet, scheduler_config, _config(SamplingMode.GT_CFG, bimodal_bias_merging=True))
    summaries = engine.run(latents, cond, uncond, token_sets, PAIR_SEEDS)

    assert "empty token selection" in caplog.text
    with pytest.raises(ValueError, match="empty"):
        product_map(summaries[0], "lexical")
    assert product_map(summaries[1], "lexical").max().item() == pytest.approx(1.0)
