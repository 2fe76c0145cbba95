"""Frozen text encoders that condition the U-Net and give each token's character span.

Every encoder is wrapped in :class:`TextEncoder`, which tokenizes with a fast tokenizer (padding
to ``max_length``, truncating), runs the model with its attention mask and returns the last hidden
state of every position. The character offsets let the grounding code align words to tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum, unique
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModel,
    AutoTokenizer,
    BertModel,
    BertTokenizerFast,
    CLIPTextModel,
    CLIPTokenizerFast,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

log = logging.getLogger(__name__)

CXR_BERT_HUB_ID = "microsoft/BiomedVLP-CXR-BERT-specialized"
# The tag that the authors of CXR-BERT pin in their own loading code (hi-ml's `pretrained.py`).
CXR_BERT_REVISION = "v1.1"
DEFAULT_MAX_LENGTH = 77


@unique
class TextEncoderType(str, Enum):
    """How to load a text encoder."""

    CXR_BERT = "cxr_bert"
    CLIP = "clip"
    AUTO = "auto"
    TINY_BERT = "tiny_bert"


@dataclass
class EncodedText:
    """Output of :class:`TextEncoder` for a batch of ``B`` texts.

    Attributes:
        last_hidden_state: ``[B, max_length, hidden_size]`` float hidden states of every position.
        attention_mask: ``[B, max_length]`` long mask, 1 for real tokens (start and end included).
        input_ids: ``[B, max_length]`` token ids.
        offsets: per text, the ``(start, end)`` character span of each position, ``(0, 0)`` for
            special tokens and padding.
    """

    last_hidden_state: torch.Tensor
    attention_mask: torch.Tensor
    input_ids: torch.Tensor
    offsets: list[list[tuple[int, int]]]


class TextEncoder(nn.Module):
    """A frozen transformer text encoder with its fast tokenizer.

    Args:
        model: a transformers model whose output has ``last_hidden_state``.
        tokenizer: the matching fast tokenizer (character offsets are needed for grounding).
        max_length: the number of token positions, padded and truncated to (77 as in SD 1.5).
        name: a label for logs and results.

    Raises:
        TypeError: when the tokenizer is not a fast tokenizer.
        ValueError: when ``max_length`` is not positive.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerFast,
        max_length: int = DEFAULT_MAX_LENGTH,
        name: str = "text_encoder",
    ) -> None:
        super().__init__()
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError(
                f"The tokenizer of text encoder {name!r} is {type(tokenizer).__name__}, which is "
                "not a fast tokenizer; grounding needs character offsets, so use a "
                "PreTrainedTokenizerFast (for example BertTokenizerFast)."
            )
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}.")

        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.name = name

        self.model.requires_grad_(False)
        self.model.eval()

    @property
    def hidden_size(self) -> int:
        """Width of ``last_hidden_state``."""
        return int(self.model.config.hidden_size)

    def train(self, mode: bool = True) -> TextEncoder:
        """Keep the encoder in eval mode, so that dropout never changes the conditioning."""
        return super().train(False)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Tokenize ``texts`` to ``max_length`` positions, with offsets."""
        return self.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_offsets_mapping=True,
            return_tensors="pt",
        )

    @torch.no_grad()
    def forward(self, texts: list[str]) -> EncodedText:
        """Encode ``texts`` into per-token hidden states.

        Args:
            texts: the captions or phrases; ``""`` gives the unconditional embedding.

        Returns:
            The hidden states, attention mask, token ids and character offsets.
        """
        tokens = self.tokenize(texts)
        device = next(self.model.parameters()).device
        input_ids = tokens["input_ids"].to(device)
        attention_mask = tokens["attention_mask"].to(device)

        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask)

        offsets = [[(int(start), int(end)) for start, end in row] for row in tokens["offset_mapping"]]
        return EncodedText(
            last_hidden_state=outputs.last_hidden_state,
            attention_mask=attention_mask,
            input_ids=input_ids,
            offsets=offsets,
        )


def _is_local(name_or_path: str) -> bool:
    return Path(name_or_path).expanduser().exists()


def _load_cxr_bert(
    name_or_path: str, revision: str | None, trust_remote_code: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load CXR-BERT's inner BERT, or its remote model code when asked to.

    The released checkpoint (``CXRBertModel``) is a ``BertForMaskedLM`` with a projection head,
    and its ``last_hidden_state`` is the inner BERT's. Loading the inner ``BertModel`` directly
    needs no remote code, so it keeps working with transformers releases that break that code.
    """
    if trust_remote_code:
        model = AutoModel.from_pretrained(name_or_path, revision=revision, trust_remote_code=True)
        if hasattr(model, "bert"):
            model = model.bert
    else:
        model = BertModel.from_pretrained(name_or_path, revision=revision, add_pooling_layer=False)
    tokenizer = BertTokenizerFast.from_pretrained(name_or_path, revision=revision)
    return model, tokenizer


def _load_clip(name_or_path: str, revision: str | None) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load a CLIP text encoder from a diffusers pipeline directory or a bare model directory."""
    subfolders = ("text_encoder", "tokenizer")
    if _is_local(name_or_path) and not (Path(name_or_path) / "text_encoder").is_dir():
        subfolders = ("", "")
    model = CLIPTextModel.from_pretrained(name_or_path, subfolder=subfolders[0], revision=revision)
    tokenizer = CLIPTokenizerFast.from_pretrained(name_or_path, subfolder=subfolders[1], revision=revision)
    return model, tokenizer


def _check_remote_code_request(encoder_type: TextEncoderType, name_or_path: str, revision: str | None) -> None:
    if revision is None and not _is_local(name_or_path):
        raise ValueError(
            f"trust_remote_code=True for {name_or_path!r} needs a pinned revision, because remote "
            f"model code runs on this machine; set text_encoder_revision (for CXR-BERT "
            f"{CXR_BERT_REVISION!r}) or leave trust_remote_code off."
        )
    if encoder_type is TextEncoderType.CLIP:
        raise ValueError("The CLIP text encoder needs no remote code; set trust_remote_code to false.")


def _check_local_directory(name_or_path: str) -> None:
    """Raise a clear error when a path-like name does not exist locally."""
    looks_like_path = name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1
    if looks_like_path and not _is_local(name_or_path):
        raise FileNotFoundError(
            f"Text encoder directory {name_or_path!r} not found. Point text_encoder_name_or_path "
            "at a local directory saved with save_pretrained, or at a hub id such as "
            f"{CXR_BERT_HUB_ID!r}."
        )


def load_text_encoder(
    name_or_path: str,
    encoder_type: TextEncoderType | str = TextEncoderType.AUTO,
    revision: str | None = None,
    trust_remote_code: bool = False,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> TextEncoder:
    """Load a frozen text encoder and its fast tokenizer.

    Args:
        name_or_path: a hub id or a local directory. For ``clip`` this may be a Stable Diffusion
            directory in diffusers layout (``text_encoder/`` and ``tokenizer/``).
        encoder_type: ``cxr_bert`` (the inner BERT of CXR-BERT), ``clip`` (SD 1.5's CLIP text
            encoder), ``auto`` (any transformers ``AutoModel`` with a fast tokenizer) or
            ``tiny_bert`` (the demo's random BERT, built in ``name_or_path`` when missing).
        revision: the hub revision; required with ``trust_remote_code`` for a hub id.
        trust_remote_code: run the checkpoint's own model code (explicit opt-in).
        max_length: token positions per text.

    Returns:
        The wrapped, frozen encoder.

    Raises:
        ValueError: on an unknown type, or remote code without a pinned revision.
        FileNotFoundError: when a local directory does not exist.
    """
    try:
        encoder_type = TextEncoderType(encoder_type)
    except ValueError as error:
        allowed = ", ".join(member.value for member in TextEncoderType)
        raise ValueError(f"Unknown text encoder type {encoder_type!r}; expected one of {allowed}.") from error

    if encoder_type is TextEncoderType.TINY_BERT:
        from lightning_modules.components.tiny_bert import build_tiny_bert

        # Built once from a fixed seed and vocabulary, then loaded like any saved model.
        build_tiny_bert(name_or_path)
        encoder_type = TextEncoderType.AUTO

    _check_local_directory(name_or_path)
    if trust_remote_code:
        _check_remote_code_request(encoder_type, name_or_path, revision)

    if encoder_type is TextEncoderType.CXR_BERT:
        model, tokenizer = _load_cxr_bert(name_or_path, revision, trust_remote_code)
    elif encoder_type is TextEncoderType.CLIP:
        model, tokenizer = _load_clip(name_or_path, revision)
    else:
        model = AutoModel.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision, use_fast=True)

    log.info(
        "Loaded text encoder %s (%s, hidden size %d, %d positions)",
        name_or_path,
        encoder_type.value,
        model.config.hidden_size,
        max_length,
    )
    return TextEncoder(model, tokenizer, max_length=max_length, name=Path(name_or_path).name or name_or_path)

