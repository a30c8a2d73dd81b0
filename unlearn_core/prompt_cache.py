"""Prompt encoding for a run that encodes the same prompts again and again (the contextual method's steps).

``PromptEncoder`` keeps, per prompt (and concept token):
- ``"ids"``: its token ids (and the token's slots), so a prompt is tokenized once per run, not once per step;
- ``"layers"``: when every trained delta sits on layer ``start`` or above (presets "final" / last_k), the frozen
  layers below ``start`` give the same output at every step: their output (the input of layer ``start``) is taken
  from the one frozen forward pass the run makes anyway (for the targets and kept conditionings), and each step
  runs only layers ``start..`` on it. Needs a backend with ``encode_capturing`` / ``encode_from`` (the diffusers
  backend); others, or a check that fails, fall back to the full forward.
Both give the conditioning the plain path gives (the cached one to float rounding); ``cache=()`` is that plain path.
"""
from __future__ import annotations

import torch

from .backend import Backend, spliced_embeddings
from .tokens import ConceptToken, token_ids

CACHES = ("ids", "layers")
CHUNK = 64  # prompts per frozen forward pass


class PromptEncoder:
    def __init__(self, backend: Backend, start_layer: int = 0, cache=CACHES):
        unknown = set(cache) - set(CACHES)
        if unknown:
            raise ValueError(f"cache: unknown entries {sorted(unknown)}; choose from {', '.join(CACHES)}")
        self.backend = backend
        self.cache_ids = "ids" in cache
        can = hasattr(backend, "encode_capturing") and hasattr(backend, "encode_from")
        self.start = start_layer if ("layers" in cache and start_layer > 0 and can) else None
        self._ids: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._hidden: dict[tuple, torch.Tensor] = {}
        self._tokens: dict[int, ConceptToken] = {}  # keeps every keyed token alive (keys use its id)
        self.notes: list[str] = []

    def _key(self, prompt: str, token: ConceptToken | None) -> tuple:
        if token is None:
            return (prompt, None)
        self._tokens[id(token)] = token
        return (prompt, id(token))

    def _ids_for(self, prompts: list[str], token: ConceptToken | None):
        """ids [B, L] and the token's slot mask [B, L] (None when no prompt holds the token)."""
        if not self.cache_ids:
            return token_ids(self.backend, prompts, token)
        keys = [self._key(p, token) for p in prompts]
        missing = list(dict.fromkeys(p for p, k in zip(prompts, keys) if k not in self._ids))
        if missing:
            ids, mask = token_ids(self.backend, missing, token)
            for i, p in enumerate(missing):
                self._ids[self._key(p, token)] = (ids[i], None if mask is None else mask[i])
        rows = [self._ids[k] for k in keys]
        ids = torch.stack([r[0] for r in rows])
        masks = [r[1] for r in rows]
        if all(m is None for m in masks):
            return ids, None
        return ids, torch.stack([torch.zeros_like(ids[0], dtype=torch.bool) if m is None else m for m in masks])

    def _run(self, ids: torch.Tensor, mask: torch.Tensor | None, token: ConceptToken | None, forward):
        if mask is None:
            return forward(ids)
        with spliced_embeddings(self.backend.token_embedding(), mask, token.vectors):
            return forward(ids)

    def frozen(self, prompts: list[str], token: ConceptToken | None = None, remember: bool = True) -> torch.Tensor:
        """The conditioning of ``prompts`` (call with the deltas off, under no_grad). With the layer cache on and
        ``remember``, the input of layer ``start`` is kept for the prompts' later training passes."""
        out = []
        for i in range(0, len(prompts), CHUNK):
            part = prompts[i:i + CHUNK]
            ids, mask = self._ids_for(part, token)
            if self.start is None or not remember:
                out.append(self._run(ids, mask, token, self.backend.encode_ids))
                continue
            cond, hidden = self._run(ids, mask, token, lambda x: self.backend.encode_capturing(x, self.start))
            for p, h in zip(part, hidden):
                self._hidden[self._key(p, token)] = h
            out.append(cond)
        return torch.cat(out)

    def check(self, prompt: str = "") -> None:
        """Turn the layer cache off (with a note) unless resuming at layer ``start`` gives the full forward's
        conditioning for ``prompt`` (already passed to ``frozen``) to 1e-5 relative (deltas off, no_grad)."""
        if self.start is None:
            return
        full = self.frozen([prompt], remember=False)
        resumed = self.backend.encode_from(self._hidden[self._key(prompt, None)][None], self.start)
        error = float((resumed.float() - full.float()).norm() / full.float().norm().clamp_min(1e-30))
        if not error <= 1e-5:
            self.notes.append(f"frozen-layer cache off: resuming at layer {self.start} differed by {error:.2g}")
            self.start = None

    def __call__(self, prompts: list[str], tokens: list[ConceptToken | None]) -> torch.Tensor:
        """Differentiable conditioning [B, L, width] of ``prompts``, ``tokens[i]`` spliced into ``prompts[i]``."""
        if self.start is not None:
            keys = [self._key(p, t) for p, t in zip(prompts, tokens)]
            if all(k in self._hidden for k in keys):
                return self.backend.encode_from(torch.stack([self._hidden[k] for k in keys]), self.start)
        groups = {id(t): t for t in tokens}
        if len(groups) == 1:
            token = tokens[0]
            ids, mask = self._ids_for(prompts, token)
            return self._run(ids, mask, token, self.backend.encode_ids)
        out = [None] * len(prompts)
        for token in groups.values():
            index = [i for i, t in enumerate(tokens) if t is token]
            ids, mask = self._ids_for([prompts[i] for i in index], token)
            for i, cond in zip(index, self._run(ids, mask, token, self.backend.encode_ids)):
                out[i] = cond
        return torch.stack(out)
