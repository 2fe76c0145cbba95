from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertModel

from lightning_modules.components.text_encoders import TextEncoder, load_text_encoder


@pytest.fixture(scope="module")
def cxr_bert_like_dir(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint laid out like CXR-BERT's: a masked-LM BERT under ``bert.``, custom model type."""
    directory = tmp_path_factory.mktemp("cxr_bert_like")
    config = BertConfig.from_pretrained(tiny_bert_dir)
    torch.manual_seed(1)
    BertForMaskedLM(config).save_pretrained(directory)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_bert_dir / name).exists():
            shutil.copy(tiny_bert_dir / name, directory / name)

    # The released config names remote model code that a plain transformers install cannot load.
    config_file = directory / "config.json"
    saved = json.loads(config_file.read_text())
    saved.update(
        model_type="cxr-bert",
        architectures=["CXRBertModel"],
        auto_map={"AutoModel": "modeling_cxrbert.CXRBertModel", "AutoConfig": "configuration_cxrbert.CXRBertConfig"},
    )
    config_file.write_text(json.dumps(saved))
    return directory


def test_encoder_output_shapes(tiny_bert_dir: Path) -> None:
    encoder = load_text_encoder(str(tiny_bert_dir), encoder_type="auto")

    encoded = encoder(["small left pleural effusion", ""])

    assert encoded.last_hidden_state.shape == (2, 77, encoder.hidden_size)
    assert encoded.attention_mask.shape == (2, 77)
    assert encoded.attention_mask[1].sum() == 2
    assert len(encoded.offsets[0]) == 77
    assert encoded.offsets[0][0] == (0, 0)
    assert encoded.offsets[0][1] == (0, 5)


def test_encoder_is_frozen_and_stays_in_eval(tiny_bert_dir: Path) -> None:
    encoder = load_text_encoder(str(tiny_bert_dir), encoder_type="auto")
    encoder.train()

    assert not encoder.model.training
    assert not any(parameter.requires_grad for parameter in encoder.parameters())


def test_long_caption_truncated_to_max_length(tiny_bert_dir: Path) -> None:
    encoder = load_text_encoder(str(tiny_bert_dir), encoder_type="auto", max_length=8)

    encoded = encoder(["small left pleural effusion and large right pleural effusion with cardiomegaly"])

    assert encoded.last_hidden_state.shape[1] == 8
    assert int(encoded.attention_mask.sum()) == 8


def test_cxr_bert_inner_bert_loads_without_remote_code(cxr_bert_like_dir: Path) -> None:
    encoder = load_text_encoder(str(cxr_bert_like_dir), encoder_type="cxr_bert", revision=None)

    reference = BertModel.from_pretrained(cxr_bert_like_dir, add_pooling_layer=False)
    tokens = encoder.tokenize(["left pleural effusion"])
    expected = reference(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state

    torch.testing.assert_close(encoder(["left pleural effusion"]).last_hidden_state, expected)
    assert isinstance(encoder, TextEncoder)


def test_remote_code_needs_pinned_revision() -> None:
    with pytest.raises(ValueError, match="pinned revision"):
        load_text_encoder("microsoft/BiomedVLP-CXR-BERT-specialized", encoder_type="cxr_bert", trust_remote_code=True)


def test_missing_local_directory_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "encoder"
    with pytest.raises(FileNotFoundError, match="not found"):
        load_text_encoder(str(missing), encoder_type="auto")


def test_unknown_encoder_type_rejected(tiny_bert_dir: Path) -> None:
    with pytest.raises(ValueError, match="Unknown text encoder type"):
        load_text_encoder(str(tiny_bert_dir), encoder_type="t5")


def test_clip_from_diffusers_layout(tiny_clip_dir: Path) -> None:
    encoder = load_text_encoder(str(tiny_clip_dir), encoder_type="clip")

    encoded = encoder(["left effusion"])

    assert encoded.last_hidden_state.shape == (1, 77, 32)
    assert encoded.offsets[0][0] == (0, 0)
    assert encoded.offsets[0][1][0] == 0
    assert int(encoded.attention_mask[0].sum()) >= 4
