"""Concept tokens (learned embedding vectors) and prompt encoding with them spliced in."""
from __future__ import annotations

import re
from dataclasses import dataclass

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


def _fill(prompt: str, name: str, word: str, n: int) -> str:
    return prompt.replace(name, " " + " ".join([word] * n) + " ")


def encode(backend: Backend, prompts: list[str], token: ConceptToken | None = None) -> torch.Tensor:
    """Conditioning for prompts; occurrences of ``token.name`` use the token's vectors (differentiably)."""
    if token is None or not any(token.name in p for p in prompts):
        return backend.encode_ids(backend.tokenize(prompts))
    n = token.n_vectors
    first = backend.tokenize([_fill(p, token.name, _PLACEHOLDERS[0], n) for p in prompts])
    second = backend.tokenize([_fill(p, token.name, _PLACEHOLDERS[1], n) for p in prompts])
    mask = first != second
    expected = torch.tensor([p.count(token.name) * n for p in prompts])
    if not torch.equal(mask.sum(dim=1).cpu(), expected):
        raise ValueError(f"a prompt is too long to hold the token {token.name!r}: shorten it")
    with spliced_embeddings(backend.token_embedding(), mask, token.vectors):
        return backend.encode_ids(first)


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
