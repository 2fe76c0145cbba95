"""Tests of the cross-attention capture processor on a tiny seeded U-Net."""

import math

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from grounding.capture import (
    CaptureError,
    CrossAttentionCaptureProcessor,
    RecordingAttentionStore,
    capture_cross_attention,
    list_cross_attention_layers,
    resolve_cross_attention_layers,
)

BATCH = 2
# The tiny U-Net of conftest.py: 12 key tokens of 16 features.
TINY_NUM_TOKENS = 12
TINY_CROSS_ATTENTION_DIM = 16


def _inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2 * BATCH, 4, 16, 16, generator=generator)
    timesteps = torch.tensor([981, 981, 500, 500])
    encoder_hidden_states = torch.randn(
        2 * BATCH, TINY_NUM_TOKENS, TINY_CROSS_ATTENTION_DIM, generator=generator
    )
    return latents, timesteps, encoder_hidden_states


def test_layers_listed_in_forward_order(tiny_unet):
    names = list_cross_attention_layers(tiny_unet)

    assert len(names) == 7
    assert [name.split(".")[0] for name in names] == ["down_blocks"] * 2 + ["mid_block"] + ["up_blocks"] * 4
    assert all(name.endswith(".attn2") for name in names)
    assert names[3] == "up_blocks.0.attentions.0.transformer_blocks.0.attn2"


def test_resolve_layers_by_index_and_name(tiny_unet):
    names = list_cross_attention_layers(tiny_unet)

    assert resolve_cross_attention_layers(tiny_unet, None) == names
    assert resolve_cross_attention_layers(tiny_unet, [-1, 0]) == [names[0], names[-1]]
    assert resolve_cross_attention_layers(tiny_unet, [names[2], 2]) == [names[2]]


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ([], "empty"),
        ([7], "out of range"),
        ([-8], "out of range"),
        (["down_blocks.0.attentions.0.transformer_blocks.0.attn1"], "Unknown"),
        ([True], "Invalid layer"),
        ([1.0], "Invalid layer"),
    ],
)
def test_resolve_layers_rejects_bad_selection(tiny_unet, layers, message):
    with pytest.raises(ValueError, match=message):
        resolve_cross_attention_layers(tiny_unet, layers)


def test_capture_keeps_unet_output(tiny_unet):
    latents, timesteps, encoder_hidden_states = _inputs()
    with torch.no_grad():
        expected = tiny_unet(latents, timesteps, encoder_hidden_states).sample

        store = RecordingAttentionStore(list_cross_attention_layers(tiny_unet))
        with capture_cross_attention(tiny_unet, store):
            store.begin_forward(torch.arange(BATCH, 2 * BATCH))
            captured = tiny_unet(latents, timesteps, encoder_hidden_states).sample
            store.end_forward()

    assert (captured - expected).abs().max().item() <= 1e-5
    assert all(len(records) == 1 for records in store.records.values())


def test_capture_without_rows_records_nothing(tiny_unet):
    latents, timesteps, encoder_hidden_states = _inputs()
    store = RecordingAttentionStore(list_cross_attention_layers(tiny_unet))
    with torch.no_grad(), capture_cross_attention(tiny_unet, store):
        store.begin_forward(None)
        tiny_unet(latents, timesteps, encoder_hidden_states)
        store.end_forward()

    assert all(len(records) == 0 for records in store.records.values())


class CountingProcessor(AttnProcessor2_0):
    """The fused processor, counting its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
        self.calls += 1
        return super().__call__(*args, **kwargs)


@pytest.mark.parametrize(("rows", "expected_calls"), [(None, 1), ([0, 1, 2, 3], 0), ([2], 1)])
def test_rows_not_recorded_use_original_processor(tiny_unet, rows, expected_calls):
    name = list_cross_attention_layers(tiny_unet)[0]
    original = CountingProcessor()
    dict(tiny_unet.named_modules())[name].set_processor(original)
    store = RecordingAttentionStore([name])
    latents, timesteps, encoder_hidden_states = _inputs()
    with torch.no_grad():
        expected = tiny_unet(latents, timesteps, encoder_hidden_states).sample
    original.calls = 0

    try:
        with torch.no_grad(), capture_cross_attention(tiny_unet, store):
            store.begin_forward(rows)
            output = tiny_unet(latents, timesteps, encoder_hidden_states).sample
            store.end_forward()
    finally:
        dict(tiny_unet.named_modules())[name].set_processor(AttnProcessor2_0())

    assert original.calls == expected_calls
    assert len(store.records[name]) == (0 if rows is None else 1)
    if rows is not None:
        assert store.records[name][0].shape[0] == len(rows)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)


def test_captured_maps_are_probabilities(tiny_unet):
    latents, timesteps, encoder_hidden_states = _inputs()
    store = RecordingAttentionStore(list_cross_attention_layers(tiny_unet))
    with torch.no_grad(), capture_cross_attention(tiny_unet, store):
        store.begin_forward([1, 3])
        tiny_unet(latents, timesteps, encoder_hidden_states)
        store.end_forward()

    query_counts = [256, 64, 64, 64, 64, 256, 256]
    for name, query_count in zip(store.layer_names, query_counts):
        (probs,) = store.records[name]
        assert probs.shape == (2, query_count, TINY_NUM_TOKENS)
        assert probs.dtype == torch.float32
        assert probs.min().item() >= 0.0
        assert torch.allclose(probs.sum(dim=-1), torch.ones(2, query_count), atol=1e-5)


def test_captured_maps_match_manual_softmax(tiny_unet):
    latents, timesteps, encoder_hidden_states = _inputs()
    name = list_cross_attention_layers(tiny_unet)[1]
    attention = dict(tiny_unet.named_modules())[name]

    # The layer's inputs, taken with a hook on the default processor's forward.
    layer_inputs = {}

    def keep_inputs(module, args, kwargs):
        layer_inputs["hidden_states"] = args[0]
        layer_inputs["encoder_hidden_states"] = kwargs["encoder_hidden_states"]

    handle = attention.register_forward_pre_hook(keep_inputs, with_kwargs=True)
    try:
        with torch.no_grad():
            tiny_unet(latents, timesteps, encoder_hidden_states)
    finally:
        handle.remove()

    with torch.no_grad():
        query = attention.to_q(layer_inputs["hidden_states"])
        key = attention.to_k(layer_inputs["encoder_hidden_states"])
        head_dim = query.shape[-1] // attention.heads
        query = query.unflatten(-1, (attention.heads, head_dim)).transpose(1, 2)
        key = key.unflatten(-1, (attention.heads, head_dim)).transpose(1, 2)
        expected = (query @ key.transpose(-1, -2) / math.sqrt(head_dim)).softmax(-1).mean(1)

    store = RecordingAttentionStore([name])
    with torch.no_grad(), capture_cross_attention(tiny_unet, store):
        store.begin_forward([0, 1, 2, 3])
        tiny_unet(latents, timesteps, encoder_hidden_states)
        store.end_forward()

    assert torch.allclose(store.records[name][0], expected, atol=1e-6)


def test_conditional_rows_select_batch_rows(tiny_unet):
    latents, timesteps, encoder_hidden_states = _inputs()
    layer_names = list_cross_attention_layers(tiny_unet)
    all_rows = RecordingAttentionStore(layer_names)
    cond_rows = RecordingAttentionStore(layer_names)
    with torch.no_grad():
        for store, rows in ((all_rows, [0, 1, 2, 3]), (cond_rows, [3, 2])):
            with capture_cross_attention(tiny_unet, store):
                store.begin_forward(rows)
                tiny_unet(latents, timesteps, encoder_hidden_states)
                store.end_forward()

    for name in layer_names:
        assert torch.allclose(cond_rows.records[name][0], all_rows.records[name][0][[3, 2]], atol=1e-6)


def test_layer_subset_leaves_other_processors(tiny_unet):
    names = list_cross_attention_layers(tiny_unet)
    store = RecordingAttentionStore([names[0], names[4]])
    originals = tiny_unet.attn_processors
    latents, timesteps, encoder_hidden_states = _inputs()

    with torch.no_grad(), capture_cross_attention(tiny_unet, store):
        during = tiny_unet.attn_processors
        store.begin_forward([0])
        tiny_unet(latents, timesteps, encoder_hidden_states)
        store.end_forward()

    captured_keys = {f"{names[0]}.processor", f"{names[4]}.processor"}
    for key, processor in during.items():
        if key in captured_keys:
            assert isinstance(processor, CrossAttentionCaptureProcessor)
        else:
            assert processor is originals[key]
    assert [len(store.records[name]) for name in store.layer_names] == [1, 1]


def test_context_restores_processors_after_error(tiny_unet):
    originals = tiny_unet.attn_processors
    store = RecordingAttentionStore(list_cross_attention_layers(tiny_unet))

    with pytest.raises(KeyError), capture_cross_attention(tiny_unet, store):
        raise KeyError("inside the capture context")

    restored = tiny_unet.attn_processors
    assert restored.keys() == originals.keys()
    assert all(restored[key] is originals[key] for key in originals)


def test_replaced_processor_raises(tiny_unet):
    names = list_cross_attention_layers(tiny_unet)
    store = RecordingAttentionStore(names)
    latents, timesteps, encoder_hidden_states = _inputs()

    with torch.no_grad(), capture_cross_attention(tiny_unet, store):
        dict(tiny_unet.named_modules())[names[5]].set_processor(AttnProcessor2_0())
        store.begin_forward([0])
        tiny_unet(latents, timesteps, encoder_hidden_states)
        with pytest.raises(CaptureError, match=r"up_blocks\.1\.attentions\.0"):
            store.end_forward()

    assert isinstance(tiny_unet.attn_processors[f"{names[5]}.processor"], AttnProcessor2_0)


def test_end_forward_without_begin_raises(tiny_unet):
    store = RecordingAttentionStore(list_cross_attention_layers(tiny_unet))

    with pytest.raises(RuntimeError, match="begin_forward"):
        store.end_forward()


def test_capture_rejects_unknown_layer(tiny_unet):
    store = RecordingAttentionStore(["down_blocks.0.attentions.0.transformer_blocks.0.attn9"])

    with pytest.raises(ValueError, match="not an attention module"):
        with capture_cross_attention(tiny_unet, store):
            pass


def test_begin_forward_rejects_2d_rows(tiny_unet):
    store = RecordingAttentionStore(list_cross_attention_layers(tiny_unet))

    with pytest.raises(ValueError, match="1-D"):
        store.begin_forward(torch.zeros(2, 2, dtype=torch.long))


def test_capture_with_key_mask_matches_default(tiny_unet):
    latents, timesteps, encoder_hidden_states = _inputs()
    key_mask = torch.ones(2 * BATCH, TINY_NUM_TOKENS)
    key_mask[:, 6:] = 0
    with torch.no_grad():
        expected = tiny_unet(
            latents, timesteps, encoder_hidden_states, encoder_attention_mask=key_mask
        ).sample
        store = RecordingAttentionStore(list_cross_attention_layers(tiny_unet))
        with capture_cross_attention(tiny_unet, store):
            store.begin_forward([2, 3])
            captured = tiny_unet(
                latents, timesteps, encoder_hidden_states, encoder_attention_mask=key_mask
            ).sample
            store.end_forward()

    assert (captured - expected).abs().max().item() <= 1e-5
    for records in store.records.values():
        assert records[0][..., 6:].max().item() < 1e-6


def test_sd15_layout_has_sixteen_layers(sd15_layout_unet):
    sections = [name.split(".")[0] for name in list_cross_attention_layers(sd15_layout_unet)]

    assert sections.count("down_blocks") == 6
    assert sections.count("mid_block") == 1
    assert sections.count("up_blocks") == 9
    assert sections == sorted(sections, key=["down_blocks", "mid_block", "up_blocks"].index)
