"""Continual erasure: concepts erased one after another into one file that grows by concept.

Each new erasure runs on the model with the earlier ones applied (``erase(..., earlier=...)``: their text-encoder
deltas hooked, frozen, and their UNet key/value edit applied), keeps the earlier concepts where the earlier adapters
put them, and keeps its own update small; its adapter is then stacked onto the earlier file (``stacking.merge``: the
exact sum, each part recorded, so ``remove`` takes any concept out again).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from . import adapter_io, stacking
from .adapter_io import NAMESPACE, AdapterFileError
from .erase import mentions
from .kv_edit import KVDeltas
from .lora import Deltas
from .stacking import Part, StoredAdapter


@dataclass
class Earlier:
    """An earlier erasure (a plain adapter or a stack) as a continual run applies it."""

    deltas: Deltas  # its text-encoder deltas (the sum of a stack's parts)
    unet: KVDeltas | None  # its UNet cross-attention key/value edit, when it has one
    concepts: tuple[str, ...]  # the concepts it erases, by name
    phrases: tuple[str, ...]  # their names and synonyms: what is kept erased
    stored: StoredAdapter  # the file's contents, which the new adapter is stacked onto
    name: str  # its file name
    # each concept's phrases and the neighbour its erasure sent it to, where its part records one ("red" -> "amber")
    sent: tuple[tuple[tuple[str, ...], str], ...] = ()


def _text_list(value) -> list[str]:
    return [v for v in value if isinstance(v, str) and v.strip()] if isinstance(value, list) else []


def _json(metadata: dict[str, str], key: str):
    try:
        return json.loads(metadata.get(f"{NAMESPACE}.{key}", "null"))
    except (ValueError, RecursionError):
        return None


def undoing_each_other(parts) -> list[str]:
    """Warnings for the parts of one stack that can undo each other: a part that sent its concept to a neighbour
    another part erases, unless that part was made after it (a continual run takes such a concept along: see
    ``erase.continual_targets``). Merged, each edit carries the other's concept back (on the benchmark world
    orange went to red and red to "amber", a phrasing of orange: the stack of ten still draws both, each part alone
    erases its own). Only targets the parts' files name are seen: "amber" is not, as orange's file does not list
    it."""
    erased = [(part, erased_concepts(part.adapter, part.name)) for part in parts]
    warnings = []
    for part, _ in erased:
        for concept, target in _targets(part.adapter.metadata).items():
            for other, theirs in erased:
                made_after = concept in _text_list(_json(other.adapter.metadata, "after"))
                if other is not part and not made_after and mentions(target, _flat(theirs)):
                    warnings.append(f"{part.name} sends {concept!r} to {target!r}, which {other.name} erases: "
                                    "merged, the two can undo each other. Erase them together in one run, or one "
                                    "after the other (each run after the earlier file), instead")
    return warnings


def _targets(metadata: dict[str, str]) -> dict[str, str]:
    """The neighbour each concept of an adapter was sent to, as its metadata records it."""
    targets = _json(metadata, "neighbour_targets")
    return {c: t for c, t in targets.items() if isinstance(t, str) and t.strip()} if isinstance(targets, dict) else {}


def _flat(concepts: dict[str, list[str]]) -> list[str]:
    return list(dict.fromkeys(p for phrases in concepts.values() for p in phrases))


def erased_concepts(stored: StoredAdapter, name: str) -> dict[str, list[str]]:
    """The concepts an adapter file erases, each with its name and synonyms, from its (or its parts') metadata."""
    concepts: dict[str, list[str]] = {}
    for part in stored.parts(name):
        metadata = part.adapter.metadata
        own = _json(metadata, "concept_synonyms")  # a joint erasure: each concept with its synonyms
        if isinstance(own, dict) and own:
            pairs = [(c, _text_list(synonyms)) for c, synonyms in own.items() if isinstance(c, str) and c.strip()]
        else:
            concept = metadata.get(f"{NAMESPACE}.concept", "")
            if not concept.strip():
                raise AdapterFileError(f"{name}: {'its part ' + part.name if stored.is_stack else 'it'} records no "
                                       "concept, so it cannot be kept erased: erase after adapters made by this tool")
            pairs = [(concept, _text_list(_json(metadata, "synonyms")))]
        for concept, synonyms in pairs:
            words = [p.strip() for p in (concept, *synonyms) if p.strip()]
            concepts[concept] = list(dict.fromkeys(concepts.get(concept, []) + words))
    return concepts


def sent_to(stored: StoredAdapter, name: str,
            concepts: dict[str, list[str]]) -> tuple[tuple[tuple[str, ...], str], ...]:
    """Each erased concept's phrases (``concepts``: ``erased_concepts`` of the file) and the neighbour its part sent
    it to (where the part records one)."""
    return tuple((tuple(concepts.get(concept, [concept])), target)
                 for part in stored.parts(name) for concept, target in _targets(part.adapter.metadata).items())


def check_config(config, option: str, hint: str = "") -> None:
    """Refuse, before any file or model is read, a run that cannot be stacked onto an earlier file: only the
    contextual method erases after earlier adapters, and full-weight deltas do not stack. ``option`` names the
    host's input in the message; ``hint`` ends it (what to do in that host)."""
    if config.method != "contextual":
        raise ValueError(f"{option}: erasing after an earlier adapter is an option of the contextual method, not "
                         f"{config.method!r}{hint}")
    if config.lora.mode == "full" and not config.lora.compress_rank:
        raise ValueError(f"{option}: full-weight deltas do not stack onto the earlier file; erase in LoRA mode, or "
                         "with a compress rank")


def read_earlier(path, backend=None) -> Earlier:
    """Read and check an earlier adapter (or stack) to erase after: a valid LoRA file with its concepts recorded;
    with a backend, one made for that model (its fingerprint recorded and matching, its shapes fitting)."""
    name = Path(path).name
    stored = stacking.load(path)
    if any(key.endswith(".diff") for key in stored.tensors):
        raise AdapterFileError(f"{name} holds full-weight deltas (.diff), which do not stack: erase it again in LoRA "
                               "mode, or with --compress-rank, to erase after it")
    concepts = erased_concepts(stored, name)
    text, unet = adapter_io.split_unet(stored.tensors)
    earlier = Earlier(Deltas.from_kohya(text).requires_grad_(False), KVDeltas.from_kohya(unet) if unet else None,
                      tuple(concepts), tuple(_flat(concepts)), stored, name, sent_to(stored, name, concepts))
    if backend is not None:
        check_earlier(earlier, backend)
    return earlier


def check_earlier(earlier: Earlier, backend) -> None:
    """Refuse an earlier adapter made for another model (or whose model cannot be checked)."""
    notes = adapter_io.check_against_backend(earlier.deltas, earlier.stored.metadata, backend, earlier.name, False)
    if notes:  # no fingerprint: the stack could not be checked against the new adapter either
        raise AdapterFileError(f"{earlier.name} records no base-model fingerprint, so whether it was made for this "
                               "model cannot be checked: erase after adapters made for this model by this tool")
    if earlier.unet is not None:
        adapter_io.check_unet_against_backend(earlier.unet, backend, earlier.name)


def new_part(result, fingerprint: dict | None, dtype: torch.dtype = torch.float16) -> StoredAdapter:
    """An erasure's adapter as the file ``write_adapter`` would write (tensors and metadata), in memory."""
    tensors = result.deltas.to_kohya(dtype) | (result.unet_deltas.to_kohya(dtype) if result.unet_deltas else {})
    metadata = adapter_io.adapter_metadata(result.deltas, fingerprint, result.info(), result.unet_deltas)
    return StoredAdapter(tensors, metadata)


def grown(earlier: Earlier | Sequence[Earlier], result, fingerprint: dict | None, name: str) -> StoredAdapter:
    """The earlier file(s) with the new erasure (``result`` of ``erase(..., earlier=...)``) stacked on as the part
    ``name``: one adapter whose effect is the exact sum, its parts recorded (``stacking.remove`` undoes it)."""
    earlier = [earlier] if isinstance(earlier, Earlier) else list(earlier)
    part = new_part(result, fingerprint)
    adapter_io.check_finite_as_written(part.tensors, name)
    return stacking.merge([Part(e.stored, e.name) for e in earlier] + [Part(part, name)])
