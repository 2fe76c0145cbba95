"""Tests of the tiny demo BERT: generic loading, WordPiece splits, conditioning and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from datamodules.phantom_findings import template_words
from lightning_modules.components import tiny_bert
from lightning_modules.components.tiny_bert import (
    BUILD_MARKER_FILE_NAME,
    SUBWORD_SPLITS,
    build_tiny_bert,
    default_vocabulary,
)

HIDDEN_SIZE = 32


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny", hidden_size=HIDDEN_SIZE, seed=0)


def _encode(directory: Path, texts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModel.from_pretrained(directory).eval()
    encoding = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        states = model(input_ids=encoding.input_ids, attention_mask=encoding.attention_mask).last_hidden_state
    return states, encoding


def _cosine(first: torch.Tensor, second: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(first, second, dim=0).item()


def test_loads_through_auto_classes(bert_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(bert_dir)
    model = AutoModel.from_pretrained(bert_dir)

    assert tokenizer.is_fast
    assert model.config.model_type == "bert"
    assert model.config.hidden_size == HIDDEN_SIZE
    assert tokenizer.model_max_length == 77


def test_states_padded_to_77(bert_dir: Path) -> None:
    states, encoding = _encode(bert_dir, ["small left pleural effusion", ""])

    assert states.shape == (2, 77, HIDDEN_SIZE)
    assert encoding.attention_mask[0].sum().item() == 6
    assert encoding.attention_mask[1].sum().item() == 2


def test_offsets_mark_word_spans(bert_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(bert_dir)
    text = "Right perihilar opacities"
    encoding = tokenizer(text, return_offsets_mapping=True)
    tokens = tokenizer.convert_ids_to_tokens(encoding.input_ids)
    spans = [text[start:end] for start, end in encoding.offset_mapping]

    assert tokens == ["[CLS]", "right", "peri", "##hil", "##ar", "opac", "##ities", "[SEP]"]
    assert spans == ["", "Right", "peri", "hil", "ar", "opac", "ities", ""]


@pytest.mark.parametrize(("word", "pieces"), sorted(SUBWORD_SPLITS.items()))
def test_domain_words_split_into_subwords(bert_dir: Path, word: str, pieces: list[str]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(bert_dir)

    assert tokenizer.tokenize(word) == pieces


def test_template_words_have_no_unknown(bert_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(bert_dir)

    for word in template_words():
        assert "[UNK]" not in tokenizer.tokenize(word), word


def test_common_words_stay_whole(bert_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(bert_dir)

    for word in ("pleural", "effusion", "left", "right", "upper", "lobe", "edema"):
        assert tokenizer.tokenize(word) == [word]


def test_distinct_words_distinct_states(bert_dir: Path) -> None:
    words = ["left", "right", "effusion", "edema", "upper", "lower", "opacity", "small"]
    states, _ = _encode(bert_dir, [" ".join(words)])
    word_states = states[0, 1 : 1 + len(words)]

    for first in range(len(words)):
        for second in range(first + 1, len(words)):
            assert _cosine(word_states[first], word_states[second]) < 0.6, (words[first], words[second])


def test_word_state_stable_across_positions(bert_dir: Path) -> None:
    states, _ = _encode(bert_dir, ["left pleural effusion", "small moderate large left lung"])

    assert _cosine(states[0, 1], states[1, 4]) > 0.95


def test_padding_states_nearly_equal(bert_dir: Path) -> None:
    states, _ = _encode(bert_dir, ["cardiomegaly"])

    assert _cosine(states[0, 10], states[0, 70]) > 0.95


def test_same_seed_same_weights(tmp_path: Path) -> None:
    first = AutoModel.from_pretrained(build_tiny_bert(tmp_path / "a", hidden_size=HIDDEN_SIZE, seed=3))
    second = AutoModel.from_pretrained(build_tiny_bert(tmp_path / "b", hidden_size=HIDDEN_SIZE, seed=3))
    other = AutoModel.from_pretrained(build_tiny_bert(tmp_path / "c", hidden_size=HIDDEN_SIZE, seed=4))

    for name, weight in first.state_dict().items():
        assert torch.equal(weight, second.state_dict()[name]), name
    assert not torch.equal(first.embeddings.word_embeddings.weight, other.embeddings.word_embeddings.weight)


def test_global_rng_untouched(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)

    build_tiny_bert(tmp_path / "bert", hidden_size=HIDDEN_SIZE)

    assert torch.equal(torch.rand(3), expected)


def test_hidden_layers_built(tmp_path: Path) -> None:
    directory = build_tiny_bert(tmp_path / "bert", hidden_size=HIDDEN_SIZE, num_hidden_layers=2)
    model = AutoModel.from_pretrained(directory)

    assert model.config.num_hidden_layers == 2
    assert len(model.encoder.layer) == 2


def test_same_arguments_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = build_tiny_bert(tmp_path / "bert", hidden_size=HIDDEN_SIZE)

    def fail_initialise(spec: tiny_bert.TinyBertSpec) -> None:
        raise AssertionError("an identical tiny BERT was rebuilt")

    monkeypatch.setattr(tiny_bert, "_initialise_model", fail_initialise)
    assert build_tiny_bert(directory, hidden_size=HIDDEN_SIZE) == directory


def test_changed_arguments_rebuild(tmp_path: Path) -> None:
    directory = build_tiny_bert(tmp_path / "bert", hidden_size=HIDDEN_SIZE)

    build_tiny_bert(directory, hidden_size=2 * HIDDEN_SIZE)

    assert AutoModel.from_pretrained(directory).config.hidden_size == 2 * HIDDEN_SIZE
    assert (directory / BUILD_MARKER_FILE_NAME).is_file()
    assert not list(tmp_path.glob(".bert.tmp-*"))


def test_empty_existing_directory_filled(tmp_path: Path) -> None:
    directory = tmp_path / "bert"
    directory.mkdir()

    build_tiny_bert(directory, hidden_size=HIDDEN_SIZE)

    assert (directory / "config.json").is_file()


def test_foreign_directory_rejected(tmp_path: Path) -> None:
    directory = tmp_path / "bert"
    directory.mkdir()
    (directory / "weights.bin").write_bytes(b"not ours")

    with pytest.raises(FileExistsError, match="contains no tiny BERT"):
        build_tiny_bert(directory, hidden_size=HIDDEN_SIZE)
    assert (directory / "weights.bin").read_bytes() == b"not ours"


def test_file_path_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bert"
    path.write_text("a file")

    with pytest.raises(NotADirectoryError, match="is a file"):
        build_tiny_bert(path, hidden_size=HIDDEN_SIZE)


def test_custom_vocabulary_used(tmp_path: Path) -> None:
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "left", "right", "effusion"]
    directory = build_tiny_bert(tmp_path / "bert", hidden_size=HIDDEN_SIZE, vocabulary=vocabulary)
    tokenizer = AutoTokenizer.from_pretrained(directory)

    assert tokenizer.tokenize("left effusion") == ["left", "effusion"]
    assert tokenizer.tokenize("edema") == ["[UNK]"]
    assert AutoModel.from_pretrained(directory).config.vocab_size == len(vocabulary)


def test_default_vocabulary_unique() -> None:
    vocabulary = default_vocabulary()

    assert vocabulary[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert len(vocabulary) == len(set(vocabulary))
    assert not set(SUBWORD_SPLITS) & set(vocabulary)


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"hidden_size": 30, "num_attention_heads": 4}, ValueError, "divisible"),
        ({"num_hidden_layers": -1}, ValueError, "num_hidden_layers"),
        ({"max_position_embeddings": 64}, ValueError, "max_position_embeddings"),
        ({"word_embedding_std": 0.0}, ValueError, "word_embedding_std"),
        ({"vocabulary": ["[UNK]", "[CLS]", "[SEP]", "[MASK]", "left"]}, ValueError, "special tokens"),
        ({"vocabulary": ["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]"]}, ValueError, "start with"),
        ({"vocabulary": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "a"]}, ValueError, "repeats"),
        ({"vocabulary": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "two words"]}, ValueError, "whitespace"),
    ],
)
def test_bad_arguments_rejected(tmp_path: Path, arguments: dict[str, object], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        build_tiny_bert(tmp_path / "bert", **arguments)
    assert not (tmp_path / "bert").exists()
