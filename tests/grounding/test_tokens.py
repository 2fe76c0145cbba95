"""Token selection on offsets from tiny fast tokenizers built offline in this file."""

import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import BertTokenizerFast, CLIPTokenizerFast, PreTrainedTokenizerFast

from grounding.tokens import (
    END_LABEL,
    FUNCTION_WORD_FILTER,
    START_LABEL,
    SpacyTagger,
    TokenStrategy,
    load_scispacy_tagger,
    select_all_strategies,
    select_tokens,
    split_words,
)

WORDPIECE_VOCABULARY = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
    "small", "left", "right", "-", "sided", "pleural", "effusion", "3", ".", "5", "cm",
    "no", "evidence", "of", "pneumothorax", "op", "##ac", "##ity", "##ities", "##ification",
    ",", ";", "the", "in", "lung", "base", "is", "seen", "without", "and", "mild", "edema",
    "!", "?", "new", "heart", "enlarged", "there",
]  # fmt: skip


@pytest.fixture(scope="module")
def bert_tokenizer() -> BertTokenizerFast:
    """A WordPiece tokenizer with BERT's normalizer, pre-tokenizer and [CLS]/[SEP] template."""
    vocabulary = {token: index for index, token in enumerate(WORDPIECE_VOCABULARY)}
    tokenizer = Tokenizer(models.WordPiece(vocabulary, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocabulary["[CLS]"]), ("[SEP]", vocabulary["[SEP]"])]
    )
    return BertTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


@pytest.fixture(scope="module")
def clip_tokenizer() -> CLIPTokenizerFast:
    """A `CLIPTokenizerFast` (byte-level BPE, `</w>` word ends, EOS as padding) with a tiny vocabulary."""
    vocabulary: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for character in "abcdefghijklmnopqrstuvwxyz0123456789.,;-":
        vocabulary[character] = len(vocabulary)
        vocabulary[character + "</w>"] = len(vocabulary)
    merges = [("l", "e"), ("le", "f"), ("lef", "t</w>"), ("e", "f"), ("ef", "f"), ("eff", "u"), ("effu", "s")]
    merges += [("effus", "i"), ("effusi", "o"), ("effusio", "n</w>")]
    for left, right in merges:
        vocabulary[left + right] = len(vocabulary)
    return CLIPTokenizerFast(vocab=vocabulary, merges=merges)


def _encode(tokenizer: PreTrainedTokenizerFast, phrase: str, max_length: int = 77) -> tuple[list, list]:
    encoding = tokenizer(
        phrase, max_length=max_length, padding="max_length", truncation=True, return_offsets_mapping=True
    )
    return encoding["offset_mapping"], encoding["attention_mask"]


def _tokens_at(tokenizer: PreTrainedTokenizerFast, phrase: str, positions: tuple[int, ...]) -> list[str]:
    input_ids = tokenizer(phrase, max_length=77, padding="max_length", truncation=True)["input_ids"]
    return [tokenizer.convert_ids_to_tokens(input_ids[position]) for position in positions]


def _select(tokenizer: PreTrainedTokenizerFast, phrase: str, strategy: str, **kwargs: object) -> object:
    offsets, attention_mask = _encode(tokenizer, phrase)
    return select_tokens(phrase, offsets, attention_mask, strategy, load_tagger=False, **kwargs)


def test_split_words_spans() -> None:
    words = split_words("Small left-sided 3.5 cm opacity,; patient's  base...")

    assert [word.text for word in words] == ["Small", "left-sided", "3.5", "cm", "opacity", "patient's", "base"]
    assert (words[1].start, words[1].end) == (6, 16)
    assert [word.text for word in split_words("-- ,;! ...")] == []


def test_lexical_hyphenated_first_subword(bert_tokenizer: BertTokenizerFast) -> None:
    selection = _select(bert_tokenizer, "Small left-sided pleural effusion", "lexical")

    assert selection.tagger == FUNCTION_WORD_FILTER
    assert selection.positions == (1, 2, 5, 6)
    assert selection.words == ("Small", "left-sided", "pleural", "effusion")
    assert _tokens_at(bert_tokenizer, "Small left-sided pleural effusion", selection.positions) == [
        "small", "left", "pleural", "effusion",
    ]  # fmt: skip
    assert selection.fallback is None


def test_lexical_drops_function_words(bert_tokenizer: BertTokenizerFast) -> None:
    phrase = "No evidence of pneumothorax"

    selection = _select(bert_tokenizer, phrase, "lexical")

    assert selection.words == ("evidence", "pneumothorax")
    assert _tokens_at(bert_tokenizer, phrase, selection.positions) == ["evidence", "pneumothorax"]


def test_lexical_number_with_unit(bert_tokenizer: BertTokenizerFast) -> None:
    phrase = "3.5 cm opacity in the left lung"

    selection = _select(bert_tokenizer, phrase, "lexical")

    # "3.5" is one word of three tokens and a number, so it is dropped; the unit stays.
    assert selection.words == ("cm", "opacity", "left", "lung")
    assert _tokens_at(bert_tokenizer, phrase, selection.positions) == ["cm", "op", "left", "lung"]


def test_lexical_punctuation_runs(bert_tokenizer: BertTokenizerFast) -> None:
    phrase = "effusion,; !? mild edema..."

    lexical = _select(bert_tokenizer, phrase, "lexical")
    all_words = _select(bert_tokenizer, phrase, "all_words")

    assert lexical.words == ("effusion", "mild", "edema")
    assert lexical.positions == (1, 6, 7)
    assert all_words.positions == tuple(range(1, 11))
    assert all_words.words[:3] == ("effusion", ",", ";")


def test_disease_all_subwords(bert_tokenizer: BertTokenizerFast) -> None:
    phrase = "new opacification and opacities"

    disease = _select(bert_tokenizer, phrase, "disease", finding="Lung Opacity")
    lexical = _select(bert_tokenizer, phrase, "lexical")

    assert _tokens_at(bert_tokenizer, phrase, disease.positions) == ["op", "##ac", "##ification", "op", "##ac", "##ities"]
    assert disease.words == ("opacification",) * 3 + ("opacities",) * 3
    assert disease.tagger == ""
    assert _tokens_at(bert_tokenizer, phrase, lexical.positions) == ["new", "op", "op"]


def test_disease_no_match_falls_back(bert_tokenizer: BertTokenizerFast) -> None:
    selection = _select(bert_tokenizer, "small left-sided effusion", "disease", finding="pneumothorax")

    assert selection.positions == (1, 2, 3, 4, 5)
    assert selection.fallback is not None
    assert "pneumothorax" in selection.fallback


def test_disease_finding_spelling_normalized(bert_tokenizer: BertTokenizerFast) -> None:
    selection = _select(bert_tokenizer, "small pleural effusion", "disease", finding="  Pleural   EFFUSION ")

    assert selection.words == ("effusion",)


def test_disease_unknown_finding_falls_back(bert_tokenizer: BertTokenizerFast, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="grounding.tokens"):
        selection = _select(bert_tokenizer, "small effusion", "disease", finding="Fracture")

    assert selection.positions == (1, 2)
    assert selection.fallback == "finding 'Fracture' has no disease keywords"
    assert "fracture" in caplog.text


def test_disease_without_finding_raises(bert_tokenizer: BertTokenizerFast) -> None:
    with pytest.raises(ValueError, match="needs the pair's finding name"):
        _select(bert_tokenizer, "small effusion", "disease")


def test_disease_chestxray14_finding_names(bert_tokenizer: BertTokenizerFast) -> None:
    selection = _select(bert_tokenizer, "small left-sided effusion", "disease", finding="Effusion")

    assert selection.words == ("effusion",)
    assert selection.fallback is None


def test_lexical_no_content_falls_back(bert_tokenizer: BertTokenizerFast) -> None:
    selection = _select(bert_tokenizer, "there is no", "lexical")

    assert selection.positions == (1, 2, 3)
    assert selection.tagger == FUNCTION_WORD_FILTER
    assert selection.fallback is not None


def test_start_and_end_tokens(bert_tokenizer: BertTokenizerFast) -> None:
    start = _select(bert_tokenizer, "small effusion", "start")
    end = _select(bert_tokenizer, "small effusion", "end")

    assert start.positions == (0,)
    assert start.words == (START_LABEL,)
    assert end.positions == (3,)
    assert end.words == (END_LABEL,)


def test_truncation_keeps_end_token(bert_tokenizer: BertTokenizerFast) -> None:
    phrase = "small left pleural effusion"
    offsets, attention_mask = _encode(bert_tokenizer, phrase, max_length=5)

    end = select_tokens(phrase, offsets, attention_mask, "end")
    lexical = select_tokens(phrase, offsets, attention_mask, "lexical", load_tagger=False)

    assert end.positions == (4,)
    assert lexical.positions == (1, 2, 3)
    assert lexical.untokenized_words == ("effusion",)


def test_truncation_inside_word(bert_tokenizer: BertTokenizerFast) -> None:
    phrase = "mild opacification"
    offsets, attention_mask = _encode(bert_tokenizer, phrase, max_length=5)

    lexical = select_tokens(phrase, offsets, attention_mask, "lexical", load_tagger=False)
    disease = select_tokens(phrase, offsets, attention_mask, "disease", finding="Lung Opacity")

    assert lexical.positions == (1, 2)
    assert disease.positions == (2, 3)
    assert lexical.untokenized_words == ()


def test_clip_bpe_alignment(clip_tokenizer: CLIPTokenizerFast) -> None:
    phrase = "Left pleural-effusion 3.5cm"

    lexical = _select(clip_tokenizer, phrase, "lexical")
    end = _select(clip_tokenizer, phrase, "end")
    all_words = _select(clip_tokenizer, phrase, "all_words")

    assert lexical.words == ("Left", "pleural-effusion")
    assert _tokens_at(clip_tokenizer, phrase, lexical.positions) == ["left</w>", "p"]
    assert "<|endoftext|>" not in _tokens_at(clip_tokenizer, phrase, all_words.positions)
    assert _tokens_at(clip_tokenizer, phrase, end.positions) == ["<|endoftext|>"]
    assert all_words.positions == tuple(range(1, end.positions[0]))


def test_clip_truncation_end_is_eos(clip_tokenizer: CLIPTokenizerFast) -> None:
    phrase = "left effusion 3.5cm"
    offsets, attention_mask = _encode(clip_tokenizer, phrase, max_length=5)

    end = select_tokens(phrase, offsets, attention_mask, "end")
    lexical = select_tokens(phrase, offsets, attention_mask, "lexical", load_tagger=False)

    input_ids = clip_tokenizer(phrase, max_length=5, padding="max_length", truncation=True)["input_ids"]
    assert end.positions == (4,)
    assert clip_tokenizer.convert_ids_to_tokens(input_ids[4]) == "<|endoftext|>"
    # "3.5cm" lost its last tokens, and the number filter drops it anyway.
    assert lexical.words == ("left", "effusion")
    assert lexical.untokenized_words == ()


def test_tensor_inputs_accepted(bert_tokenizer: BertTokenizerFast) -> None:
    phrase = "small effusion"
    offsets, attention_mask = _encode(bert_tokenizer, phrase)

    selection = select_tokens(phrase, torch.tensor(offsets), torch.tensor(attention_mask), load_tagger=False)

    assert selection.positions == (1, 2)


def test_input_guards(bert_tokenizer: BertTokenizerFast) -> None:
    offsets, attention_mask = _encode(bert_tokenizer, "small effusion")

    with pytest.raises(ValueError, match="attention mask of length"):
        select_tokens("small effusion", offsets[:10], attention_mask)
    with pytest.raises(ValueError, match="must mark position 0"):
        select_tokens("small effusion", offsets, [0] + attention_mask[1:])
    with pytest.raises(ValueError, match="another text"):
        select_tokens("small", offsets, attention_mask)
    with pytest.raises(ValueError, match="not a valid TokenStrategy"):
        select_tokens("small effusion", offsets, attention_mask, "nouns")
    empty_offsets, empty_mask = _encode(bert_tokenizer, "")
    with pytest.raises(ValueError, match="no token between"):
        select_tokens("", empty_offsets, empty_mask, "all_words")
    assert select_tokens("", empty_offsets, empty_mask, "end").positions == (1,)


@dataclass
class FakeSpacyToken:
    text: str
    idx: int
    pos_: str


class FakeSpacyPipeline:
    """Splits on spaces and hyphens and tags from a fixed table, as a spaCy pipeline would."""

    TAGS = {"left": "ADJ", "-": "PUNCT", "sided": "VERB", "effusion": "NOUN", "small": "ADV", "is": "AUX"}

    def __call__(self, text: str) -> list[FakeSpacyToken]:
        tokens = []
        index = 0
        for piece in text.replace("-", " - ").split():
            index = text.index(piece, index)
            tokens.append(FakeSpacyToken(piece, index, self.TAGS.get(piece.lower(), "X")))
            index += len(piece)
        return tokens


def test_lexical_with_spacy_tagger(bert_tokenizer: BertTokenizerFast) -> None:
    phrase = "small left-sided effusion"
    tagger = SpacyTagger(FakeSpacyPipeline(), "scispacy:fake")

    selection = _select(bert_tokenizer, phrase, "lexical", tagger=tagger)

    # The tagger's own segmentation counts: "left" and "sided" are two words, "small" an adverb.
    assert selection.tagger == "scispacy:fake"
    assert selection.words == ("left", "sided", "effusion")
    assert _tokens_at(bert_tokenizer, phrase, selection.positions) == ["left", "sided", "effusion"]


def rule_tagged_spacy_pipeline(spacy: types.ModuleType) -> object:
    """A real blank English spaCy pipeline whose attribute ruler sets part-of-speech tags by word."""
    nlp = spacy.blank("en")
    ruler = nlp.add_pipe("attribute_ruler")
    for words, tag in ((["left", "right", "small"], "ADJ"), (["sided"], "VERB"), (["effusion", "cm"], "NOUN")):
        ruler.add(patterns=[[{"LOWER": {"IN": words}}]], attrs={"POS": tag})
    return nlp


def test_lexical_with_real_spacy_pipeline(bert_tokenizer: BertTokenizerFast) -> None:
    spacy = pytest.importorskip("spacy")
    phrase = "small left-sided 3.5 cm effusion."
    tagger = SpacyTagger(rule_tagged_spacy_pipeline(spacy), "scispacy:rules")

    selection = _select(bert_tokenizer, phrase, "lexical", tagger=tagger)

    # spaCy splits the hyphen off as its own token. The untagged "3.5" and "." are not kept.
    assert selection.words == ("small", "left", "sided", "cm", "effusion")
    assert _tokens_at(bert_tokenizer, phrase, selection.positions) == ["small", "left", "sided", "cm", "effusion"]


@pytest.fixture
def fake_spacy_module(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Install a stand-in `spacy` module whose `load` finds only en_core_sci_sm."""
    requested: list[str] = []

    def load(name: str) -> FakeSpacyPipeline:
        requested.append(name)
        if name != "en_core_sci_sm":
            raise OSError(f"[E050] Can't find model '{name}'.")
        return FakeSpacyPipeline()

    monkeypatch.setitem(sys.modules, "spacy", types.SimpleNamespace(load=load))
    load_scispacy_tagger.cache_clear()
    yield requested
    load_scispacy_tagger.cache_clear()


def test_scispacy_loader_tries_models(fake_spacy_module: list[str], bert_tokenizer: BertTokenizerFast) -> None:
    tagger = load_scispacy_tagger()
    offsets, attention_mask = _encode(bert_tokenizer, "left-sided effusion")
    selection = select_tokens("left-sided effusion", offsets, attention_mask, "lexical")

    assert tagger is not None
    assert tagger.name == "scispacy:en_core_sci_sm"
    assert fake_spacy_module == ["en_core_sci_scibert", "en_core_sci_sm"]
    assert selection.tagger == "scispacy:en_core_sci_sm"
    assert load_scispacy_tagger() is tagger
    assert len(fake_spacy_module) == 2


def test_scispacy_loader_without_spacy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "spacy", None)
    load_scispacy_tagger.cache_clear()
    try:
        assert load_scispacy_tagger() is None
    finally:
        load_scispacy_tagger.cache_clear()


def test_select_all_strategies(bert_tokenizer: BertTokenizerFast) -> None:
    offsets, attention_mask = _encode(bert_tokenizer, "small pleural effusion")

    with_finding = select_all_strategies("small pleural effusion", offsets, attention_mask, "Pleural Effusion", None, False)
    without = select_all_strategies("small pleural effusion", offsets, attention_mask, load_tagger=False)

    assert set(with_finding) == set(TokenStrategy)
    assert TokenStrategy.DISEASE not in without
    assert with_finding[TokenStrategy.DISEASE].positions == (3,)
