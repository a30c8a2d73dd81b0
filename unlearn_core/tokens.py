"""Concept tokens (learned embedding vectors) and prompt encoding with them spliced in."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .backend import Backend, spliced_embeddings

_TOKEN_NAME = re.compile(r"^[A-Za-z0-9<>_\-.]{1,64}$")
# Two different single-token words: the positions where the two tokenizations differ are the token's slots,
# whatever else the prompt contains.
_PLACEHOLDERS = ("x", "y")
CLIP_SPECIAL_IDS = (49406, 49407)  # <|startoftext|>, <|endoftext|> in the CLIP BPE vocabulary all SD2 hosts share


def check_token_name(name: str) -> str:
    if not _TOKEN_NAME.match(name or ""):
        raise ValueError(
            f"token name {name!r} is not usable: use 1-64 letters, digits, '<', '>', '_', '-' or '.', no spaces"
        )
    return name


def is_vocabulary_word(name: str) -> bool:
    """Whether ``name`` is a whole word of the CLIP BPE vocabulary every SD2 host shares (which holds every
    stop word: "a", "the", "of", ...)."""
    vocabulary = Path(__file__).parent / "sd2_config" / "tokenizer" / "vocab.json"
    with open(vocabulary, encoding="utf-8") as f:
        return f"{name.lower()}</w>" in json.load(f)


def check_token_is_not_a_word(name: str) -> str:
    """A token stands for its name wherever the name appears in a prompt as a whole word: a token called "cat"
    or "a" would silently replace that word in every erase and preserve prompt."""
    if is_vocabulary_word(name):
        bracketed = f"<{name.strip('<>')}-token>"
        raise ValueError(f"token name {name!r} is an ordinary word of the text encoder's vocabulary, so it would "
                         f"replace that word in every prompt; use a name that is not a word, e.g. {bracketed!r} "
                         "(learn the token again under such a name; a file that records no name is named by its file name)")
    return name


def token_file_stem(name: str) -> str:
    """File stem for a token's file: hosts name an embedding after its file, and '<' '>' are not allowed
    in Windows file names, so ``<my-cat>`` is saved as ``my-cat.safetensors``."""
    stem = (name or "").strip().strip("<>")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", stem):
        raise ValueError(f"token {name!r}: use letters, digits, '_', '-' or '.' (optionally in <>), e.g. <my-cat>")
    return stem


def _occurrences(name: str) -> re.Pattern:
    """``name`` as a whole word: a token called ``cat`` must not match inside ``concatenate`` or ``cats``."""
    return re.compile(rf"(?<![\w-]){re.escape(name)}(?![\w-])")


@dataclass
class ConceptToken:
    """A learned token: ``vectors`` [n_vectors, width] stand for ``name`` in prompts."""

    name: str
    vectors: torch.Tensor

    def __post_init__(self):
        check_token_name(self.name)
        if self.vectors.ndim != 2 or self.vectors.shape[0] < 1:
            raise ValueError(f"token vectors must have shape [n_vectors, width], got {tuple(self.vectors.shape)}")

    @property
    def n_vectors(self) -> int:
        return self.vectors.shape[0]


def token_ids(backend: Backend, prompts: list[str], token: ConceptToken | None = None):
    """Token ids [B, L] for prompts and, when ``token`` occurs in them, the mask [B, L] of its slots (else None)."""
    pattern = _occurrences(token.name) if token is not None else None
    if pattern is None or not any(pattern.search(p) for p in prompts):
        return backend.tokenize(prompts), None
    n = token.n_vectors

    def fill(word: str) -> list[str]:
        return [pattern.sub(" " + " ".join([word] * n) + " ", p) for p in prompts]

    first = backend.tokenize(fill(_PLACEHOLDERS[0]))
    second = backend.tokenize(fill(_PLACEHOLDERS[1]))
    mask = first != second
    expected = torch.tensor([len(pattern.findall(p)) * n for p in prompts])
    if not torch.equal(mask.sum(dim=1).cpu(), expected):
        raise ValueError(f"a prompt is too long to hold the token {token.name!r}: shorten it")
    return first, mask


def encode(backend: Backend, prompts: list[str], token: ConceptToken | None = None) -> torch.Tensor:
    """Conditioning for prompts; occurrences of ``token.name`` use the token's vectors (differentiably)."""
    ids, mask = token_ids(backend, prompts, token)
    if mask is None:
        return backend.encode_ids(ids)
    with spliced_embeddings(backend.token_embedding(), mask, token.vectors):
        return backend.encode_ids(ids)


def init_vectors(backend: Backend, init_word: str, n_vectors: int) -> torch.Tensor:
    """Start vectors from the embedding of ``init_word`` (its tokens, repeated to n_vectors)."""
    ids = backend.tokenize([init_word])[0]
    table = backend.token_embedding().weight
    word_ids = []
    for i in ids[1:].tolist():
        if i in CLIP_SPECIAL_IDS:
            break
        word_ids.append(i)
    if not word_ids:
        raise ValueError(f"init word {init_word!r} has no tokens; give a real word such as 'object' or 'style'")
    rows = table[torch.tensor(word_ids, device=table.device)].float()
    return torch.stack([rows[i % len(rows)] for i in range(n_vectors)]).detach().clone().cpu()
