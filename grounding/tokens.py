"""Selection of the token positions whose attention maps form a phrase's activation map.

The text encoder's fast tokenizer gives every token position a character span of the
phrase, with (0, 0) for special tokens and padding. Position 0 is the start token ([CLS] or
BOS) and the end token ([SEP] or EOS) is the last position the attention mask marks, also
when the phrase was truncated. Words are found in the phrase by character spans and mapped
to the tokens that overlap them, so the mapping holds for any subword tokenizer and never
depends on counting whitespace-separated words.
"""

import functools
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum, unique
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

# ScispaCy pipelines tried in order; the first one that loads tags the phrases.
SCISPACY_MODELS = ("en_core_sci_scibert", "en_core_sci_sm")
FUNCTION_WORD_FILTER = "function-word-filter"
CONTENT_TAGS = frozenset({"ADJ", "NOUN", "VERB"})
START_LABEL = "<start>"
END_LABEL = "<end>"

# A word is a run of letters and digits. Hyphens and apostrophes inside it ("left-sided",
# "patient's") and a period between digits ("3.5") do not split it.
WORD_PATTERN = re.compile(r"[^\W_]+(?:(?:[-'\u2019]|(?<=\d)\.(?=\d))[^\W_]+)*")

# Closed-class words that a part-of-speech tagger does not tag ADJ, NOUN or VERB:
# determiners and quantifiers, pronouns, prepositions, conjunctions, auxiliaries and modals,
# negations, number words, and the hedging and degree adverbs common in radiology reports.
# Other adverbs are open-class and stay, because a word list cannot recognise them all.
FUNCTION_WORDS = frozenset(
    """
    a an the this that these those some any each every either neither another other such
    what which whose whom who whatever all both few many much more most less least several
    i me my we us our you your he him his she her it its they them their there here itself
    themselves
    about above across after against along among around as at before behind below beneath
    beside besides between beyond by despite down during except for from in inside into like
    near of off on onto out outside over per since through throughout to toward towards under
    underneath until up upon via with within without versus vs
    and or but nor so yet if then than because although though while whereas whether
    am is are was were be been being has have had having do does did can could may might must
    shall should will would
    not no none never
    zero one two three four five six seven eight nine ten
    also again still now very quite rather somewhat slightly mildly moderately markedly
    minimally partially largely possibly probably perhaps otherwise just only too however
    additionally further
    """.split()
)

# Keyword stems per MS-CXR finding: a word matches when it contains one of them, so
# "opacit" covers "opacity" and "opacities" and "opacif" covers "opacification".
DISEASE_KEYWORDS: dict[str, tuple[str, ...]] = {
    "atelectasis": ("atelecta",),
    "cardiomegaly": ("cardiomegaly", "cardiac", "heart"),
    "consolidation": ("consolidat",),
    "edema": ("edema", "oedema"),
    "lung opacity": ("opacit", "opacif"),
    "pleural effusion": ("effusion",),
    "pneumonia": ("pneumoni",),
    "pneumothorax": ("pneumothora",),
    # ChestX-ray14 box findings whose names differ from the MS-CXR ones.
    "effusion": ("effusion",),
    "infiltrate": ("infiltrat",),
    "infiltration": ("infiltrat",),
    "mass": ("mass",),
    "nodule": ("nodul",),
}


@unique
class TokenStrategy(str, Enum):
    """Rule that picks the token positions of a phrase."""

    LEXICAL = "lexical"
    DISEASE = "disease"
    ALL_WORDS = "all_words"
    START = "start"
    END = "end"


@dataclass(frozen=True)
class Word:
    """A word of the phrase and its character span [start, end)."""

    text: str
    start: int
    end: int


@dataclass(frozen=True)
class SpacyTagger:
    """A loaded spaCy pipeline and the label results record for it, e.g. `scispacy:en_core_sci_sm`."""

    nlp: Callable[[str], Iterable[Any]]
    name: str


@dataclass(frozen=True)
class TokenSelection:
    """The token positions picked for one phrase.

    Attributes:
        strategy: Rule that picked them.
        positions: Token positions in ascending order, within [0, end position].
        words: For each position, the word it belongs to (`<start>` or `<end>` for the
            special tokens, the token's own text for punctuation).
        tagger: `scispacy:<model>` or `function-word-filter` for `lexical`, else "".
        fallback: Why all tokens between start and end were used, or None.
        untokenized_words: Words with no token left, because truncation cut them off.
    """

    strategy: TokenStrategy
    positions: tuple[int, ...]
    words: tuple[str, ...]
    tagger: str = ""
    fallback: str | None = None
    untokenized_words: tuple[str, ...] = ()


@functools.lru_cache(maxsize=1)
def load_scispacy_tagger() -> SpacyTagger | None:
    """Load the first installed ScispaCy pipeline of `SCISPACY_MODELS`, once per process.

    Returns:
        The tagger, or None when spaCy or every model is missing (then `lexical` uses the
        function-word filter).
    """
    try:
        import spacy
    except ImportError:
        logger.info("spaCy is not installed; lexical token selection uses the function-word filter.")
        return None

    # NOTE: the tests run this path with a stand-in pipeline only. How closely the function-word
    # filter agrees with en_core_sci_scibert's tags has not been measured.
    for model_name in SCISPACY_MODELS:
        try:
            nlp = spacy.load(model_name)
        except OSError:
            continue
        logger.info("Lexical token selection tags phrases with ScispaCy model %s.", model_name)
        return SpacyTagger(nlp=nlp, name=f"scispacy:{model_name}")

    logger.info("No ScispaCy model of %s is installed; lexical selection uses the function-word filter.", SCISPACY_MODELS)
    return None


def split_words(phrase: str) -> list[Word]:
    """Find the words of a phrase by `WORD_PATTERN`, skipping punctuation and spaces."""
    return [Word(match.group(), match.start(), match.end()) for match in WORD_PATTERN.finditer(phrase)]


def is_function_word(word: str) -> bool:
    """Return whether the function-word filter drops a word (a `FUNCTION_WORDS` entry or a number)."""
    lowered = word.lower()
    return lowered in FUNCTION_WORDS or lowered[0].isdigit()


def _tagged_content_words(phrase: str, tagger: SpacyTagger) -> list[Word]:
    content_words = []
    for token in tagger.nlp(phrase):
        text = str(token.text)
        if token.pos_ in CONTENT_TAGS and any(character.isalnum() for character in text):
            content_words.append(Word(text, int(token.idx), int(token.idx) + len(text)))
    return content_words


def _normalize_offsets(
    phrase: str, offsets: Sequence[tuple[int, int]] | torch.Tensor | np.ndarray, attention_mask: Any
) -> tuple[list[tuple[int, int]], int]:
    if isinstance(attention_mask, torch.Tensor):
        attention_mask = attention_mask.detach().cpu().numpy()
    mask = np.asarray(attention_mask).reshape(-1)
    if isinstance(offsets, torch.Tensor):
        offsets = offsets.detach().cpu().tolist()
    spans = [(int(start), int(end)) for start, end in offsets]

    if len(spans) != mask.size:
        raise ValueError(f"Got {len(spans)} token offsets but an attention mask of length {mask.size}; pass both of one encoding.")
    attended = np.flatnonzero(mask)
    if attended.size < 2 or attended[0] != 0:
        raise ValueError(
            "The attention mask must mark position 0 (start token) and a later end token, but it marks "
            f"positions {attended[:8].tolist()}; encode the phrase with its special tokens."
        )
    if max(end for _, end in spans) > len(phrase):
        raise ValueError(
            f"Token offsets reach past the end of phrase {phrase!r} ({len(phrase)} characters); "
            "the offsets belong to another text."
        )
    return spans, int(attended[-1])


def _positions_in_span(word: Word, spans: list[tuple[int, int]], end_position: int) -> list[int]:
    # Tokens with an empty span are special tokens or padding; only content positions count.
    return [
        position
        for position in range(1, end_position)
        if spans[position][1] > spans[position][0] and spans[position][0] < word.end and spans[position][1] > word.start
    ]


def _all_content_positions(
    phrase: str, words: list[Word], spans: list[tuple[int, int]], end_position: int
) -> tuple[list[int], list[str]]:
    positions = list(range(1, end_position))
    labels = []
    for position in positions:
        start, end = spans[position]
        containing = [word.text for word in words if word.start < end and word.end > start]
        labels.append(containing[0] if containing else phrase[start:end])
    return positions, labels


def _finding_keywords(finding: str | None) -> tuple[str, ...]:
    """Return the keyword stems of a finding, or () for a finding without keywords.

    Raises:
        ValueError: If `finding` is None or blank.
    """
    key = " ".join((finding or "").lower().split())
    if not key:
        raise ValueError("Disease token selection needs the pair's finding name, got none.")
    keywords = DISEASE_KEYWORDS.get(key, ())
    if not keywords:
        _warn_unknown_finding(key)
    return keywords


@functools.lru_cache(maxsize=None)
def _warn_unknown_finding(finding: str) -> None:
    # Cached, so that each unknown finding is logged once per process and not once per pair.
    logger.warning(
        "Finding %r has no disease keywords (known: %s). Disease token selection uses all word tokens for it.",
        finding,
        ", ".join(sorted(DISEASE_KEYWORDS)),
    )


def select_tokens(
    phrase: str,
    offsets: Sequence[tuple[int, int]] | torch.Tensor | np.ndarray,
    attention_mask: Sequence[int] | torch.Tensor | np.ndarray,
    strategy: TokenStrategy | str = TokenStrategy.LEXICAL,
    finding: str | None = None,
    tagger: SpacyTagger | None = None,
    load_tagger: bool = True,
) -> TokenSelection:
    """Pick the token positions of one phrase by a `TokenStrategy`.

    - `lexical`: words tagged ADJ, NOUN or VERB, first subword token of each. The tagger is
      `tagger`, else the installed ScispaCy model (when `load_tagger`), else a filter that
      drops `FUNCTION_WORDS` and numbers.
    - `disease`: every subword token of each word that contains a keyword of `finding`.
    - `all_words`: every token between the start and end token, punctuation included.
    - `start`: position 0. `end`: the last position the attention mask marks.

    When `lexical` keeps no word or `disease` matches none, all tokens between start and end
    are used and `fallback` says why.

    Args:
        phrase: The text that was encoded.
        offsets: Character span (start, end) per token position, e.g. 77 of them, with (0, 0)
            for special tokens and padding.
        attention_mask: 1 for the start token, the phrase's tokens and the end token, 0 for
            padding; same length as `offsets`.
        strategy: Selection rule.
        finding: Finding name (e.g. "Lung Opacity"), required for `disease`. A finding without
            keywords in `DISEASE_KEYWORDS` falls back to all tokens, with a warning.
        tagger: A spaCy pipeline to use for `lexical` in place of the installed one.
        load_tagger: Whether `lexical` may load an installed ScispaCy model when `tagger` is
            None; False forces the function-word filter.

    Returns:
        The selected positions and the words they came from.

    Raises:
        ValueError: If offsets and mask do not fit each other or the phrase, the phrase has
            no token between start and end, or `disease` gets no finding.
    """
    strategy = TokenStrategy(strategy)
    spans, end_position = _normalize_offsets(phrase, offsets, attention_mask)

    if strategy is TokenStrategy.START:
        return TokenSelection(strategy, (0,), (START_LABEL,))
    if strategy is TokenStrategy.END:
        return TokenSelection(strategy, (end_position,), (END_LABEL,))

    if end_position < 2:
        raise ValueError(f"Phrase {phrase!r} has no token between the start and end token; it cannot be grounded.")
    words = split_words(phrase)
    content_positions, content_labels = _all_content_positions(phrase, words, spans, end_position)
    if strategy is TokenStrategy.ALL_WORDS:
        return TokenSelection(strategy, tuple(content_positions), tuple(content_labels))

    # Choose the words, and whether each contributes its first subword token or all of them.
    tagger_name = ""
    if strategy is TokenStrategy.LEXICAL:
        if tagger is None and load_tagger:
            tagger = load_scispacy_tagger()
        if tagger is not None:
            tagger_name = tagger.name
            chosen_words = _tagged_content_words(phrase, tagger)
        else:
            tagger_name = FUNCTION_WORD_FILTER
            chosen_words = [word for word in words if not is_function_word(word.text)]
        first_token_only = True
        no_match_reason = f"no word of {phrase!r} is an adjective, noun or verb"
    else:
        keywords = _finding_keywords(finding)
        chosen_words = [word for word in words if any(keyword in word.text.lower() for keyword in keywords)]
        first_token_only = False
        no_match_reason = f"no word of {phrase!r} contains a keyword of {finding!r} {keywords}"
        if not keywords:
            no_match_reason = f"finding {finding!r} has no disease keywords"

    # Map each chosen word to its tokens by character overlap.
    positions: list[int] = []
    labels: list[str] = []
    untokenized: list[str] = []
    for word in chosen_words:
        word_positions = _positions_in_span(word, spans, end_position)
        if not word_positions:
            untokenized.append(word.text)
            continue
        for position in word_positions[:1] if first_token_only else word_positions:
            if position not in positions:
                positions.append(position)
                labels.append(word.text)
    if untokenized:
        logger.debug("Words %s of %r have no token left after truncation.", untokenized, phrase)

    if not positions:
        return TokenSelection(
            strategy, tuple(content_positions), tuple(content_labels), tagger_name, no_match_reason, tuple(untokenized)
        )
    order = np.argsort(positions, kind="stable")
    return TokenSelection(
        strategy,
        tuple(positions[index] for index in order),
        tuple(labels[index] for index in order),
        tagger_name,
        None,
        tuple(untokenized),
    )


def select_all_strategies(
    phrase: str,
    offsets: Sequence[tuple[int, int]] | torch.Tensor | np.ndarray,
    attention_mask: Sequence[int] | torch.Tensor | np.ndarray,
    finding: str | None = None,
    tagger: SpacyTagger | None = None,
    load_tagger: bool = True,
) -> dict[TokenStrategy, TokenSelection]:
    """Run `select_tokens` for every strategy; `disease` only when `finding` is given.

    Raises:
        ValueError: As `select_tokens`.
    """
    strategies = [strategy for strategy in TokenStrategy if finding is not None or strategy is not TokenStrategy.DISEASE]
    return {
        strategy: select_tokens(phrase, offsets, attention_mask, strategy, finding, tagger, load_tagger)
        for strategy in strategies
    }
