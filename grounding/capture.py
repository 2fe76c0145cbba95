"""Capture of cross-attention probabilities from a diffusers U-Net.

`CrossAttentionCaptureProcessor` replaces the processor of chosen cross-attention (`attn2`)
layers of a `diffusers.UNet2DConditionModel`. It computes the same layer output as the default
processor, but with the attention probabilities `softmax(Q K^T / sqrt(d))` written out, averages
them over heads, keeps the batch rows that the store requests (the conditional branch) and hands them to
an `AttentionStore`. Every other layer keeps its own processor.

Usage::

    store = RecordingAttentionStore(resolve_cross_attention_layers(unet, None))
    with capture_cross_attention(unet, store):
        store.begin_forward(conditional_rows=torch.arange(batch_size, 2 * batch_size))
        unet(latents, timesteps, encoder_hidden_states)
        store.end_forward()  # raises if a configured layer was not captured

Layers are named as in `unet.named_modules()` (for example
`up_blocks.1.attentions.0.transformer_blocks.0.attn2`) or indexed in forward order: down blocks,
mid block, up blocks. Stable Diffusion 1.5 has 16 such layers (6 down, 1 mid, 9 up).
"""

import logging
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

logger = logging.getLogger(__name__)

CROSS_ATTENTION_SUFFIX = "attn2"

# `named_modules()` lists the mid block after the up blocks because diffusers registers it last,
# so forward order is restored from the top-level block name.
_BLOCK_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def _forward_order_key(name: str) -> tuple[int, list[int]]:
    top_level = name.split(".", 1)[0]
    block_rank = _BLOCK_ORDER.get(top_level, len(_BLOCK_ORDER))
    return block_rank, [int(number) for number in re.findall(r"\d+", name)]


def list_cross_attention_layers(unet: nn.Module) -> list[str]:
    """List the cross-attention (`attn2`) layer names of a U-Net in forward order.

    Args:
        unet: A `diffusers.UNet2DConditionModel` or any module whose cross-attention layers are
            diffusers `Attention` modules named `...attn2`.

    Returns:
        Module names ordered down blocks, mid block, up blocks.
    """
    names = [
        name
        for name, module in unet.named_modules()
        if isinstance(module, Attention) and name.rsplit(".", 1)[-1] == CROSS_ATTENTION_SUFFIX
    ]
    return sorted(names, key=_forward_order_key)


def resolve_cross_attention_layers(
    unet: nn.Module, layers: Sequence[str | int] | None
) -> list[str]:
    """Resolve a layer selection to cross-attention layer names in forward order.

    Args:
        unet: The U-Net.
        layers: Layer names, positions in forward order (0-based, negative counts from the end),
            or a mix. `None` selects every cross-attention layer.

    Returns:
        The selected names, without duplicates, in forward order.

    Raises:
        ValueError: If the U-Net has no cross-attention layer, if the selection is empty, or if
            a name or position does not exist.
    """
    available = list_cross_attention_layers(unet)
    if not available:
        raise ValueError("The U-Net has no cross-attention (attn2) layer to capture.")
    if layers is None:
        return available
    if len(layers) == 0:
        raise ValueError("The layer selection is empty. Pass None to capture every attn2 layer.")

    selected: set[str] = set()
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, (int, str)):
            raise ValueError(f"Invalid layer {layer!r}: expected an attn2 module name or an index.")
        if isinstance(layer, int):
            if not -len(available) <= layer < len(available):
                raise ValueError(
                    f"Layer index {layer} is out of range: the U-Net has {len(available)} "
                    "cross-attention layers."
                )
            selected.add(available[layer])
        elif layer in available:
            selected.add(layer)
        else:
            raise ValueError(f"Unknown cross-attention layer {layer!r}. Available: {available}.")
    return [name for name in available if name in selected]


class CaptureError(RuntimeError):
    """A configured cross-attention layer did not run through its capture processor."""


class AttentionStore:
    """Receiver of head-averaged attention probabilities from the capture processors.

    Before each U-Net forward pass the caller sets the batch rows to capture with
    `begin_forward`. After the pass, `end_forward` checks that every configured layer ran through
    a capture processor. Subclasses implement `record`.

    Args:
        layer_names: The captured layers, in forward order; `record` receives positions in it.
    """

    def __init__(self, layer_names: Sequence[str]) -> None:
        if len(layer_names) == 0:
            raise ValueError("An attention store needs at least one layer name.")
        self.layer_names = list(layer_names)
        self.conditional_rows: torch.Tensor | None = None
        self._called_layers: set[int] = set()
        self._in_forward = False

    def begin_forward(self, conditional_rows: torch.Tensor | Sequence[int] | None) -> None:
        """Start a forward pass that captures the given batch rows.

        Args:
            conditional_rows: Batch indices whose probabilities are recorded, in the order
                `record` receives them. With classifier-free guidance and a batch
                `[uncond, cond]` of 2B rows, these are `B..2B-1`. `None` or an empty selection
                records nothing in this pass, but the layers are still checked.
        """
        if conditional_rows is not None:
            conditional_rows = torch.as_tensor(conditional_rows, dtype=torch.long)
            if conditional_rows.ndim != 1:
                raise ValueError(
                    f"conditional_rows must be a 1-D list of batch indices, got shape "
                    f"{tuple(conditional_rows.shape)}."
                )
            if conditional_rows.numel() == 0:
                conditional_rows = None
        self.conditional_rows = conditional_rows
        self._called_layers = set()
        self._in_forward = True

    def mark_called(self, layer_position: int) -> None:
        """Note that the capture processor of a layer ran in the current forward pass."""
        self._called_layers.add(layer_position)

    def end_forward(self) -> None:
        """Finish a forward pass and check that every configured layer was captured.

        Raises:
            RuntimeError: If `begin_forward` was not called.
            CaptureError: If a configured layer did not run through its capture processor (for
                example because another processor replaced it inside the capture context).
        """
        if not self._in_forward:
            raise RuntimeError("end_forward was called without a matching begin_forward.")
        self._in_forward = False
        self.conditional_rows = None

        missing = [
            name
            for position, name in enumerate(self.layer_names)
            if position not in self._called_layers
        ]
        if missing:
            raise CaptureError(
                f"Cross-attention layers {missing} were not captured in the last forward pass. "
                "Another attention processor may have replaced the capture processor "
                "(for example unet.set_attn_processor inside capture_cross_attention); "
                "install the capture processors last."
            )

    def record(self, layer_position: int, attention_probs: torch.Tensor) -> None:
        """Receive the probabilities of one layer in one forward pass.

        Args:
            layer_position: Position of the layer in `layer_names`.
            attention_probs: `[R, Q, N]` float32 probabilities for the R rows of
                `conditional_rows` in that order, Q = h_l * w_l query positions (row-major over
                the layer's feature map) and N key tokens; each row sums to 1 over N.
        """
        raise NotImplementedError


class RecordingAttentionStore(AttentionStore):
    """Store that keeps every recorded map, for inspection and small tests.

    `records[layer_name]` lists one `[R, Q, N]` tensor per forward pass that captured rows.
    Memory grows with every pass, so the streaming accumulator of `grounding.maps` is the
    choice for evaluation.

    Args:
        layer_names: The captured layers.
        to_cpu: Copy every map to the CPU as it arrives.
    """

    def __init__(self, layer_names: Sequence[str], to_cpu: bool = False) -> None:
        super().__init__(layer_names)
        self.to_cpu = to_cpu
        self.records: dict[str, list[torch.Tensor]] = {name: [] for name in self.layer_names}

    def record(self, layer_position: int, attention_probs: torch.Tensor) -> None:
        """Append the maps of one layer and forward pass to `records`."""
        if self.to_cpu:
            attention_probs = attention_probs.cpu()
        self.records[self.layer_names[layer_position]].append(attention_probs)


class CrossAttentionCaptureProcessor:
    """Attention processor that computes the default output and records the probabilities.

    The math is that of diffusers' `AttnProcessor2_0` with the softmax written out: scores
    `Q K^T / sqrt(d)` plus the optional additive mask, softmax over keys (in float32 when the
    layer upcasts), then the probabilities times V, for the rows it records. Rows it does not
    record (the unconditional half under classifier-free guidance, or every row of a pass
    without capture) go through the layer's own processor (by default the fused
    `AttnProcessor2_0`).

    Args:
        store: The receiver of the probabilities.
        layer_position: Position of this layer in `store.layer_names`.
        fallback: Processor for the rows that are not recorded, usually the one this processor
            replaces; None uses `AttnProcessor2_0`.
    """

    def __init__(self, store: AttentionStore, layer_position: int, fallback: object | None = None) -> None:
        self.store = store
        self.layer_position = layer_position
        self._fallback_processor = fallback if fallback is not None else AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: object,
        **kwargs: object,
    ) -> torch.Tensor:
        """Compute the layer output for `hidden_states` `[B, Q, C]` (or `[B, C, h, w]`)."""
        self.store.mark_called(self.layer_position)
        rows = self.store.conditional_rows
        if rows is None:
            return self._fallback_processor(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb
            )
        batch_size = hidden_states.shape[0]
        if rows.numel() == batch_size and torch.equal(rows, torch.arange(batch_size)):
            return self._explicit_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

        # The explicit softmax runs on the recorded rows only (the conditional half under CFG),
        # and the layer's own processor computes the others.
        recorded = rows.to(hidden_states.device)
        others = torch.ones(batch_size, dtype=torch.bool, device=hidden_states.device)
        others[recorded] = False
        others = others.nonzero().squeeze(1)

        def take(tensor: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
            return None if tensor is None else tensor.index_select(0, index)

        recorded_output = self._explicit_attention(
            attn,
            take(hidden_states, recorded),
            take(encoder_hidden_states, recorded),
            take(attention_mask, recorded),
            take(temb, recorded),
        )
        output = recorded_output.new_empty((batch_size, *recorded_output.shape[1:]))
        output.index_copy_(0, recorded, recorded_output)
        if others.numel():
            other_output = self._fallback_processor(
                attn,
                take(hidden_states, others),
                take(encoder_hidden_states, others),
                take(attention_mask, others),
                take(temb, others),
            )
            output.index_copy_(0, others, other_output.to(output.dtype))
        return output

    def _explicit_attention(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        temb: torch.Tensor | None,
    ) -> torch.Tensor:
        """Compute the layer output with the softmax written out, and record every row's probabilities."""
        # Input preparation, as in the default processor.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        # Projections to [B, heads, tokens, head_dim].
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # AttnProcessor2_0 scales by 1/sqrt(d) and ignores `attn.scale`, so this does the same.
        # Scaling the query before the product costs less than scaling the scores.
        dtype = query.dtype
        if attn.upcast_attention:
            query = query.float()
            key = key.float()
        attention_scores = torch.matmul(query * (1.0 / math.sqrt(head_dim)), key.transpose(-1, -2))
        if attention_mask is not None:
            attention_scores = attention_scores + attention_mask
        if attn.upcast_softmax:
            attention_scores = attention_scores.float()
        attention_probs = attention_scores.softmax(dim=-1).to(dtype)

        self.store.record(self.layer_position, attention_probs.mean(dim=1, dtype=torch.float32))

        # Output, as in the default processor.
        hidden_states = torch.matmul(attention_probs, value.to(attention_probs.dtype))
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def capture_cross_attention(unet: nn.Module, store: AttentionStore) -> Iterator[AttentionStore]:
    """Install capture processors on the store's layers and restore the originals on exit.

    Args:
        unet: The U-Net whose `attn2` layers are named in `store.layer_names`.
        store: The receiver of the probabilities.

    Yields:
        The store.

    Raises:
        ValueError: If a layer name is not a cross-attention layer of the U-Net.
    """
    modules = dict(unet.named_modules())
    attention_layers = []
    for name in store.layer_names:
        module = modules.get(name)
        if not isinstance(module, Attention):
            raise ValueError(
                f"Layer {name!r} is not an attention module of this U-Net. "
                f"Available: {list_cross_attention_layers(unet)}."
            )
        attention_layers.append(module)

    original_processors = [module.processor for module in attention_layers]
    try:
        for position, (module, original) in enumerate(zip(attention_layers, original_processors)):
            module.set_processor(CrossAttentionCaptureProcessor(store, position, fallback=original))
        yield store
    finally:
        for module, processor in zip(attention_layers, original_processors):
            module.set_processor(processor)
