"""Shared fixtures: tiny models built and saved by the tests themselves, never downloaded."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers.models import TINY_HIDDEN_SIZE, tiny_unet_config

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


# Keep the tests off the network and W&B offline, whatever the machine's settings.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT with a WordPiece tokenizer, saved with ``save_pretrained``."""
    from lightning_modules.components.tiny_bert import build_tiny_bert

    return build_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), hidden_size=TINY_HIDDEN_SIZE, seed=0)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CLIP text encoder and BPE tokenizer in Stable Diffusion's diffusers layout."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizerFast

    root = tmp_path_factory.mktemp("tiny_sd")
    tokenizer_dir = root / "tokenizer"
    tokenizer_dir.mkdir()

    letters = list("abcdefghijklmnopqrstuvwxyz")
    vocabulary = ["<|startoftext|>", "<|endoftext|>"] + letters + [f"{letter}</w>" for letter in letters]
    merges = ["#version: 0.2", "l e", "le f", "lef t</w>", "e f", "f u", "s i", "o n</w>"]
    for merge in merges[1:]:
        vocabulary.append(merge.replace(" ", ""))
    (tokenizer_dir / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(vocabulary)}))
    (tokenizer_dir / "merges.txt").write_text("\n".join(merges) + "\n")
    tokenizer = CLIPTokenizerFast(
        vocab_file=str(tokenizer_dir / "vocab.json"),
        merges_file=str(tokenizer_dir / "merges.txt"),
        pad_token="<|endoftext|>",
    )
    tokenizer.save_pretrained(tokenizer_dir)

    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=len(vocabulary),
        hidden_size=TINY_HIDDEN_SIZE,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    CLIPTextModel(config).save_pretrained(root / "text_encoder")
    return root


@pytest.fixture()
def tiny_module_kwargs(tiny_bert_dir: Path) -> dict[str, Any]:
    """Keyword arguments of a CPU-sized ``LatentDiffusionModule`` on the identity latent."""
    return {
        "unet_config": tiny_unet_config(),
        "latent": "identity",
        "text_encoder_name_or_path": str(tiny_bert_dir),
        "text_encoder_type": "auto",
        "text_encoder_revision": None,
        "learning_rate": 1e-3,
        "lr_warmup_steps": 2,
        "ema_decay": 0.9,
        "ema_warmup": False,
    }
