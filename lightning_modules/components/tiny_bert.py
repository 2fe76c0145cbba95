"""A tiny, randomly initialised BERT text encoder for the demo and for tests.

The demo cannot download CXR-BERT, so it conditions the U-Net on this stand-in. It is saved in
the Hugging Face layout (``config.json``, weights, ``vocab.txt``, tokenizer files) and loads
through the generic ``AutoModel.from_pretrained`` and ``AutoTokenizer.from_pretrained`` path,
like the real encoder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import string
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from datamodules.phantom_findings import template_words

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BUILD_MARKER_FILE_NAME = "tiny_bert_build.json"
MODEL_MAX_LENGTH = 77

# Words stored only as WordPiece pieces, so that they split into several subword tokens as
# domain terms do in a general-purpose BERT vocabulary. Greedy longest-match-first WordPiece
# reproduces exactly these splits because no longer piece of these words is in the vocabulary.
SUBWORD_SPLITS: dict[str, list[str]] = {
    "cardiomegaly": ["cardio", "##me", "##gal", "##y"],
    "pneumothorax": ["pneumo", "##thorax"],
    "consolidation": ["consolid", "##ation"],
    "atelectasis": ["ate", "##lect", "##asis"],
    "opacities": ["opac", "##ities"],
    "perihilar": ["peri", "##hil", "##ar"],
    "cardiomediastinal": ["cardio", "##media", "##stinal"],
    "multifocal": ["multi", "##focal"],
}

# Common report words outside the phantom templates, so that free text tokenizes mostly to words.
REPORT_WORDS = [
    "a", "an", "as", "be", "bilateral", "both", "but", "can", "change", "changes", "compared",
    "could", "decreased", "degenerative", "device", "evidence", "fracture", "has", "have",
    "hemidiaphragm", "increased", "interval", "likely", "limits", "line", "lines", "low",
    "markings", "may", "minimal", "new", "not", "on", "other", "otherwise", "possible", "prior",
    "represent", "seen", "severe", "since", "size", "stable", "status", "subsegmental", "there",
    "to", "tube", "unchanged", "vascular", "volumes", "within", "without",
]  # fmt: skip


@dataclass(frozen=True)
class TinyBertSpec:
    """Everything that determines the saved model; its hash makes ``build_tiny_bert`` idempotent."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    seed: int
    word_embedding_std: float
    position_embedding_std: float
    vocabulary: tuple[str, ...]


def default_vocabulary() -> list[str]:
    """Build the default WordPiece vocabulary, special tokens first.

    It contains the special tokens, ASCII punctuation and digits, every lower-case letter alone
    and as a ``##`` continuation (so no lower-case ASCII word maps to ``[UNK]``), the phantom
    template words, ``REPORT_WORDS``, and the pieces of ``SUBWORD_SPLITS`` in place of those
    whole words.
    """
    tokens: list[str] = list(SPECIAL_TOKENS)
    tokens += list(string.punctuation) + list(string.digits) + list(string.ascii_lowercase)
    tokens += [f"##{character}" for character in string.digits + string.ascii_lowercase]

    words = sorted(set(template_words()) | set(REPORT_WORDS))
    tokens += [word for word in words if word not in SUBWORD_SPLITS]
    for pieces in SUBWORD_SPLITS.values():
        tokens += pieces

    # Keep the first occurrence of each token, so ids stay stable when lists overlap.
    return list(dict.fromkeys(tokens))


def _validate_vocabulary(vocabulary: list[str]) -> None:
    missing = [token for token in SPECIAL_TOKENS if token not in vocabulary]
    if missing:
        raise ValueError(f"The vocabulary lacks the special tokens {missing}; add them, [PAD] first.")
    if vocabulary[0] != "[PAD]":
        raise ValueError(f"The vocabulary must start with [PAD] (id 0), got {vocabulary[0]!r} first.")
    bad = [token for token in vocabulary if not token or any(character.isspace() for character in token)]
    if bad:
        raise ValueError(f"Vocabulary tokens must be non-empty and contain no whitespace, got {bad[:5]}.")
    duplicates = sorted({token for token in vocabulary if vocabulary.count(token) > 1})
    if duplicates:
        raise ValueError(f"The vocabulary repeats the tokens {duplicates[:5]}; list each once.")


def _spec_hash(spec: TinyBertSpec) -> str:
    payload = json.dumps(dataclasses.asdict(spec), sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _read_build_hash(directory: Path) -> str | None:
    marker = directory / BUILD_MARKER_FILE_NAME
    if not marker.is_file():
        return None
    try:
        return str(json.loads(marker.read_text(encoding="utf-8"))["spec_hash"])
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        logger.warning("Ignoring unreadable tiny BERT marker %s: %s", marker, error)
        return ""


def _initialise_model(spec: TinyBertSpec) -> BertModel:
    """Create the model and overwrite its embeddings with seeded, well-conditioned values."""
    config = BertConfig(
        vocab_size=len(spec.vocabulary),
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        type_vocab_size=1,
        pad_token_id=0,
    )

    # Seed a private copy of the global RNG, which BertModel's own initialisation draws from.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = BertModel(config)
        generator = torch.Generator().manual_seed(spec.seed)
        with torch.no_grad():
            embeddings = model.embeddings
            embeddings.word_embeddings.weight.copy_(
                torch.randn(embeddings.word_embeddings.weight.shape, generator=generator) * spec.word_embedding_std
            )
            embeddings.position_embeddings.weight.copy_(
                torch.randn(embeddings.position_embeddings.weight.shape, generator=generator)
                * spec.position_embedding_std
            )
            embeddings.token_type_embeddings.weight.zero_()
    return model.eval()


def build_tiny_bert(
    save_directory: str | Path,
    hidden_size: int = 64,
    num_hidden_layers: int = 0,
    seed: int = 0,
    vocabulary: list[str] | None = None,
    num_attention_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 128,
    word_embedding_std: float = 1.0,
    position_embedding_std: float = 0.05,
) -> Path:
    """Build and save a seeded random ``BertModel`` with a WordPiece ``BertTokenizerFast``.

    The token states must tell words apart clearly and stay stable across positions, because a
    frozen random encoder is all the U-Net learns from. Hence the defaults:

    - no transformer layers, so a token's state is ``LayerNorm(word + position)`` and does not
      depend on its neighbours (the U-Net's cross-attention can still bind words by position),
    - word embeddings drawn from ``N(0, word_embedding_std**2)`` in ``hidden_size`` dimensions,
      which are nearly orthogonal: the cosine of two random 64-d vectors has a standard
      deviation of ``1/sqrt(64) = 0.125``,
    - position embeddings 20 times smaller, so the same word at another position keeps a cosine
      above about 0.99 with itself,
    - ``[PAD]`` with an ordinary random embedding, so all padding states are nearly equal.

    With ``num_hidden_layers > 0`` the layers keep BERT's default random initialisation. The
    call is idempotent: a directory built with the same arguments is returned as is, and
    another one is replaced.

    Args:
        save_directory: Where to save; created if missing.
        hidden_size: Size of the token states. Must equal the U-Net's ``cross_attention_dim``.
        num_hidden_layers: Transformer layers after the embeddings, 0 or more.
        seed: Seed of all weights.
        vocabulary: WordPiece tokens, ``[PAD]`` first and all of ``SPECIAL_TOKENS`` included;
            ``default_vocabulary()`` when ``None``.
        num_attention_heads: Heads per layer; must divide ``hidden_size``.
        intermediate_size: Feed-forward size of each layer; ``4 * hidden_size`` when ``None``.
        max_position_embeddings: Longest input in tokens, at least 77.
        word_embedding_std: Standard deviation of the word embeddings.
        position_embedding_std: Standard deviation of the position embeddings.

    Returns:
        ``save_directory`` as a ``Path``.

    Raises:
        ValueError: If a size is out of range or the vocabulary is malformed.
        FileExistsError: If ``save_directory`` is not empty and was not written by this
            function, so it may contain files that are not ours to replace.
        NotADirectoryError: If ``save_directory`` is a file.
    """
    if hidden_size < 1 or hidden_size % num_attention_heads != 0:
        raise ValueError(
            f"hidden_size must be positive and divisible by num_attention_heads, got {hidden_size} "
            f"and {num_attention_heads}."
        )
    if num_hidden_layers < 0:
        raise ValueError(f"num_hidden_layers must be >= 0, got {num_hidden_layers}.")
    if max_position_embeddings < MODEL_MAX_LENGTH:
        raise ValueError(
            f"max_position_embeddings must be >= {MODEL_MAX_LENGTH}, the padded text length, "
            f"got {max_position_embeddings}."
        )
    if word_embedding_std <= 0 or position_embedding_std < 0:
        raise ValueError(
            "word_embedding_std must be > 0 and position_embedding_std >= 0, got "
            f"{word_embedding_std} and {position_embedding_std}."
        )
    tokens = default_vocabulary() if vocabulary is None else list(vocabulary)
    _validate_vocabulary(tokens)

    spec = TinyBertSpec(
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size if intermediate_size is not None else 4 * hidden_size,
        max_position_embeddings=max_position_embeddings,
        seed=seed,
        word_embedding_std=word_embedding_std,
        position_embedding_std=position_embedding_std,
        vocabulary=tuple(tokens),
    )
    spec_hash = _spec_hash(spec)
    directory = Path(save_directory).expanduser().absolute()
    found_hash = _read_build_hash(directory)
    if found_hash == spec_hash:
        logger.info("Reusing tiny BERT at %s", directory)
        return directory
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"Tiny BERT save_directory {directory} is a file; pass a directory path.")
    if found_hash is None and directory.is_dir() and any(directory.iterdir()):
        raise FileExistsError(
            f"{directory} is not empty and contains no tiny BERT (no {BUILD_MARKER_FILE_NAME}); "
            "pass an empty or new directory."
        )

    # Save into a temporary sibling and rename, so that a reader never sees a partial model.
    directory.parent.mkdir(parents=True, exist_ok=True)
    temporary = directory.parent / f".{directory.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temporary.mkdir()
    try:
        (temporary / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
        tokenizer = BertTokenizerFast(
            vocab=str(temporary / "vocab.txt"), do_lower_case=True, model_max_length=MODEL_MAX_LENGTH
        )
        tokenizer.save_pretrained(temporary)
        _initialise_model(spec).save_pretrained(temporary)
        marker = {"spec_hash": spec_hash, "hidden_size": hidden_size, "num_hidden_layers": num_hidden_layers}
        (temporary / BUILD_MARKER_FILE_NAME).write_text(json.dumps(marker, indent=2), encoding="utf-8")

        if directory.exists():
            shutil.rmtree(directory)
        temporary.rename(directory)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
    logger.info("Saved tiny BERT (%d tokens, hidden size %d) to %s", len(tokens), hidden_size, directory)
    return directory
