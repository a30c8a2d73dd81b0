"""Stacks of erasure adapters: several adapters merged into one file whose effect is the exact sum of theirs,
and any one of them taken out again.

A stack is an ordinary kohya text-encoder LoRA (every host loads it like any other) whose rank is the sum of its
parts' ranks. Part i owns rows [start_i, stop_i) of every module's lora_down and the same columns of its lora_up:

    lora_down = [down_1; down_2; ...]                 (the parts' rows, unchanged)
    lora_up   = [up_1 * f_1, up_2 * f_2, ...]         f_i = strength_i * alpha_i / rank_i (its scale, folded in)
    alpha     = rank of the stack                     (scale 1 for every part)

so up @ down * alpha / rank = sum_i f_i * up_i @ down_i, the parts' deltas added. A module that a part does not
adapt holds zeros in that part's block, and a module of lower rank than the part's widest is padded with zero rows
and columns: every module has the stack's rank and every part the same rank range in every module (hosts and our
reader need one rank per file); the record keeps each module's own rank.

The metadata key ``concept_unlearn.stack`` records each part: concept, method, file name, strength, rank range,
the modules it adapts, its alphas, the dtypes it was stored in and its own metadata (audit included). ``remove``
takes every other part's original tensors back out of the stack and merges them again, so
``remove(merge([A, B, C]), "B")`` equals ``merge([A, C])`` bit for bit, and a stack of a single part at strength 1
is that part's original file (tensors bit for bit, metadata as it was).

Exactness: a stack is stored in float32, one step wider than the float16 / bfloat16 adapters are written in (the
fold is then undone exactly: x * f rounded to float32 and divided by f lands within 2**-23 of x, far inside half a
float16 / bfloat16 step, so rounding back gives x). A float32 part whose scale does not fold exactly in float32
makes the stack float64. Every merge checks that each part comes back bit for bit before anything is returned.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch

from . import adapter_io
from .adapter_io import NAMESPACE, AdapterFileError

STACK_KEY = f"{NAMESPACE}.stack"
STACK_VERSION = 1
DOWN, UP, ALPHA = "lora_down.weight", "lora_up.weight", "alpha"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
         torch.float64: torch.int64}  # integers of the same width, to compare floats bit for bit
_STACK_DTYPES = (torch.float32, torch.float64)  # tried in this order


# ---------------------------------------------------------------------------- in-memory forms

@dataclass(frozen=True)
class StoredAdapter:
    """An adapter file's contents: its tensors exactly as stored and its metadata (a plain adapter or a stack)."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]

    @property
    def is_stack(self) -> bool:
        return STACK_KEY in self.metadata

    def info(self, key: str, default=None):
        return self.metadata.get(f"{NAMESPACE}.{key}", default)

    def parts(self, name: str = "stack") -> list["Part"]:
        """The parts of a stack (their original tensors), or this adapter as its only part."""
        return unstack(self, name) if self.is_stack else [Part(self, name)]

    def with_info(self, **info) -> "StoredAdapter":
        """Extra ``concept_unlearn.*`` metadata (e.g. an audit of the stack as a whole)."""
        extra = {f"{NAMESPACE}.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in info.items()}
        return replace(self, metadata={**self.metadata, **extra})


@dataclass(frozen=True)
class Part:
    """One adapter in a stack: a plain adapter's file contents, the name it is listed under, its strength."""

    adapter: StoredAdapter
    name: str
    strength: float = 1.0

    @property
    def concept(self) -> str:
        return self.adapter.info("concept") or Path(self.name).stem

    @property
    def method(self) -> str:
        return self.adapter.info("method") or "unknown"

    @property
    def modules(self) -> list[str]:
        return sorted({key.partition(".")[0] for key in self.adapter.tensors})

    @property
    def ranks(self) -> dict[str, int]:
        """Each adapted module's own rank."""
        return {m: int(self.adapter.tensors[f"{m}.{DOWN}"].shape[0]) for m in self.modules}

    @property
    def rank(self) -> int:
        """The width of this part's block in a stack: its widest module's rank."""
        return max(self.ranks.values())


@dataclass
class _Module:
    out_features: int
    in_features: int
    owner: str  # the part that fixed these shapes (named in errors)
    downs: list[torch.Tensor] = field(default_factory=list)
    ups: list[torch.Tensor] = field(default_factory=list)


# ---------------------------------------------------------------------------- reading and writing

def check_adapter(adapter: StoredAdapter, name: str) -> None:
    """What ``adapter_io.read_adapter`` checks (keys, shapes, dtypes, finite values, SD2 marks, fingerprint)."""
    adapter_io.validate_adapter_tensors(adapter.tensors, name)
    adapter_io._check_marked_for_sd2(adapter.metadata, name)
    adapter_io.parse_fingerprint(adapter.metadata.get(f"{NAMESPACE}.base_fingerprint"), name)


def load(path) -> StoredAdapter:
    """Read an adapter file with safetensors only and validate it (a stack's record is checked when used)."""
    tensors, metadata = adapter_io._read(path)
    adapter = StoredAdapter(tensors, metadata)
    check_adapter(adapter, Path(path).name)
    return adapter


def write(path, adapter: StoredAdapter, overwrite: bool = False) -> Path:
    """Validate, then publish atomically (never replacing a file unless ``overwrite``), as write_adapter does."""
    name = Path(path).name
    check_adapter(adapter, name)
    adapter_io.check_finite_as_written(adapter.tensors, name)
    return adapter_io.atomic_save(adapter.tensors, path, adapter.metadata, overwrite)


def parts_from_files(paths: Sequence, strengths: Sequence[float] | None = None) -> list[Part]:
    """One part per file (a stack file's parts, each at its strength times the file's)."""
    strengths = list(strengths) if strengths else [1.0] * len(paths)
    if len(strengths) != len(paths):
        raise ValueError(f"{len(strengths)} strength(s) for {len(paths)} adapter(s): give one per adapter, or none")
    parts = []
    for path, strength in zip(paths, strengths):
        parts += [replace(p, strength=p.strength * strength) for p in load(path).parts(Path(path).name)]
    return parts


def merge_files(paths: Sequence, out, strengths: Sequence[float] | None = None, overwrite: bool = False,
                allow_other_base: bool = False) -> tuple[Path, StoredAdapter]:
    merged = merge(parts_from_files(paths, strengths), allow_other_base)
    return write(out, merged, overwrite), merged


def remove_from_file(path, concept: str, out, overwrite: bool = False) -> tuple[Path, StoredAdapter]:
    rest = remove(load(path), concept, Path(path).name)
    return write(out, rest, overwrite), rest


# ---------------------------------------------------------------------------- merge

def merge(parts: Sequence[Part], allow_other_base: bool = False) -> StoredAdapter:
    """One adapter whose effect is the sum of the parts' (each times its strength); stacks among the parts are
    opened into their own parts. A single part at strength 1 is returned as it is."""
    parts = [replace(p, strength=p.strength * q.strength) for q in parts for p in q.adapter.parts(q.name)]
    if not parts:
        raise ValueError("nothing to merge: give one or more erasure adapters")
    for part in parts:
        _check_part(part)
    _check_distinct(parts)
    fingerprint = _common_fingerprint(parts, allow_other_base)
    if len(parts) == 1 and parts[0].strength == 1.0:
        return parts[0].adapter
    problems = []
    for dtype in _STACK_DTYPES:
        if any(_stored_dtype(p) == torch.float64 for p in parts) and dtype != torch.float64:
            continue
        stack = _build(parts, fingerprint, dtype)
        problems = _round_trip_problems(stack, parts)
        if not problems:
            return stack
    raise AdapterFileError(f"the stack could not keep every part exactly ({problems[0]}): use strengths near 1")


def _check_part(part: Part) -> None:
    if any(key.endswith(".diff") for key in part.adapter.tensors):
        raise AdapterFileError(f"{part.name} holds full-weight deltas (.diff), which do not stack by rank: erase "
                               "it again in LoRA mode, or with --compress-rank to save it as a LoRA")
    if not (isinstance(part.strength, (int, float)) and math.isfinite(part.strength) and part.strength != 0):
        raise ValueError(f"strength of {part.name} is {part.strength}: give a finite number other than 0 "
                         "(leave an adapter out instead of giving it strength 0)")
    check_adapter(part.adapter, part.name)
    dtypes = {}
    for key, tensor in part.adapter.tensors.items():
        dtypes.setdefault(key.partition(".")[2], set()).add(tensor.dtype)
    if any(len(kinds) > 1 for kinds in dtypes.values()):
        raise AdapterFileError(f"{part.name} stores its modules in mixed dtypes: re-save it in one dtype to stack it")


def _check_distinct(parts: list[Part]) -> None:
    seen: dict[str, str] = {}
    for part in parts:
        key = part.concept.strip().casefold()
        if key in seen:
            raise ValueError(f"{seen[key]} and {part.name} both erase {part.concept!r}: a stack holds each concept "
                             "once, so that it can be removed by name (weigh one adapter with a strength instead)")
        seen[key] = part.name


def _common_fingerprint(parts: list[Part], allow_other_base: bool) -> dict | None:
    """The base-model fingerprint all parts record (they must agree unless ``allow_other_base``)."""
    first, first_name = None, None
    for part in parts:
        recorded = adapter_io.parse_fingerprint(part.adapter.info("base_fingerprint"), part.name)
        if recorded is None:
            if allow_other_base:
                continue
            raise AdapterFileError(f"{part.name} records no base-model fingerprint, so it cannot be checked against "
                                   "the other adapters: stack it only if it was made for the same model, and allow "
                                   "other bases (--force-base)")
        if first is None:
            first, first_name = recorded, part.name
        elif not adapter_io.fingerprints_match(first, recorded) and not allow_other_base:
            raise AdapterFileError(f"{part.name} and {first_name} were made for different base models (their "
                                   "text-encoder fingerprints differ): stack adapters of the same model, or allow "
                                   "other bases (--force-base)")
    return first


def _stored_dtype(part: Part) -> torch.dtype:
    return part.adapter.tensors[f"{part.modules[0]}.{UP}"].dtype


def _scales(part: Part) -> dict[str, float]:
    """f = strength * alpha / rank of each module (the factor its lora_up columns carry in the stack)."""
    return {m: part.strength * float(part.adapter.tensors[f"{m}.{ALPHA}"]) / r for m, r in part.ranks.items()}


def _build(parts: list[Part], fingerprint: dict | None, dtype: torch.dtype) -> StoredAdapter:
    modules: dict[str, _Module] = {}
    for part in parts:
        for m in part.modules:
            tensors = part.adapter.tensors
            out_features, in_features = tensors[f"{m}.{UP}"].shape[0], tensors[f"{m}.{DOWN}"].shape[1]
            known = modules.setdefault(m, _Module(out_features, in_features, part.name))
            if (known.out_features, known.in_features) != (out_features, in_features):
                raise AdapterFileError(f"{part.name} adapts {m} as [{out_features}, {in_features}], {known.owner} "
                                       f"as [{known.out_features}, {known.in_features}]: they were made for "
                                       "different models")
    records, start = [], 0
    for part in parts:
        scales, rank = _scales(part), part.rank
        for m, module in modules.items():
            down = torch.zeros(rank, module.in_features, dtype=dtype)
            up = torch.zeros(module.out_features, rank, dtype=dtype)
            if m in scales:
                own = part.adapter.tensors[f"{m}.{DOWN}"].shape[0]
                down[:own] = part.adapter.tensors[f"{m}.{DOWN}"].to(dtype)
                up[:, :own] = (part.adapter.tensors[f"{m}.{UP}"].double() * scales[m]).to(dtype)
            module.downs.append(down)
            module.ups.append(up)
        records.append(_record(part, start, start + rank))
        start += rank
    total = start
    tensors = {}
    for m, module in sorted(modules.items()):
        tensors[f"{m}.{DOWN}"] = torch.cat(module.downs, 0).contiguous()
        tensors[f"{m}.{UP}"] = torch.cat(module.ups, 1).contiguous()
        tensors[f"{m}.{ALPHA}"] = torch.tensor(float(total), dtype=dtype)
    return StoredAdapter(tensors, _stack_metadata(parts, records, total, fingerprint))


def _record(part: Part, start: int, stop: int) -> dict:
    tensors = part.adapter.tensors
    alphas = {m: float(tensors[f"{m}.{ALPHA}"]) for m in part.modules}
    values = set(alphas.values())
    return {
        "concept": part.concept, "method": part.method, "file": part.name, "strength": part.strength,
        "ranks": [start, stop], "modules": part.modules,
        **({"module_ranks": part.ranks} if len(set(part.ranks.values())) > 1 else {}),
        "alpha": values.pop() if len(values) == 1 else alphas,
        "dtypes": {suffix: str(tensors[f"{part.modules[0]}.{suffix}"].dtype).removeprefix("torch.")
                   for suffix in (DOWN, UP, ALPHA)},
        "metadata": dict(sorted(part.adapter.metadata.items())),  # files list metadata in no fixed order
    }


def _stack_metadata(parts: list[Part], records: list[dict], rank: int, fingerprint: dict | None) -> dict[str, str]:
    concepts = [p.concept for p in parts]
    metadata = {
        "ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank),
        "ss_v2": "True", "ss_base_model_version": "sd_v2",
        f"{NAMESPACE}.format_version": adapter_io.FORMAT_VERSION, f"{NAMESPACE}.mode": "lora",
        f"{NAMESPACE}.concept": ", ".join(concepts), f"{NAMESPACE}.concepts": json.dumps(concepts),
        f"{NAMESPACE}.method": "stack",
        STACK_KEY: json.dumps({"version": STACK_VERSION, "rank": rank, "parts": records}),
    }
    if fingerprint:
        metadata[f"{NAMESPACE}.base_fingerprint"] = json.dumps(fingerprint)
    return metadata


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(_BITS[a.dtype]), b.view(_BITS[b.dtype]))


def _round_trip_problems(stack: StoredAdapter, parts: list[Part]) -> list[str]:
    back = unstack(stack)
    problems = []
    for original, returned in zip(parts, back):
        a, b = original.adapter.tensors, returned.adapter.tensors
        if a.keys() != b.keys() or not all(_same_bits(a[k].reshape(-1), b[k].reshape(-1)) for k in a):
            problems.append(f"{original.name} at strength {original.strength:g} does not come back bit for bit")
    return problems


# ---------------------------------------------------------------------------- unstack and remove

def unstack(stack: StoredAdapter, name: str = "stack") -> list[Part]:
    """The parts of a stack with their original tensors (bit for bit) and metadata, in stack order."""
    record = _stack_record(stack, name)
    parts = []
    for entry in record["parts"]:
        start, stop = entry["ranks"]
        dtypes = {suffix: _DTYPES[entry["dtypes"][suffix]] for suffix in (DOWN, UP, ALPHA)}
        alphas = entry["alpha"] if isinstance(entry["alpha"], dict) else dict.fromkeys(entry["modules"], entry["alpha"])
        ranks = _module_ranks(entry)
        tensors = {}
        for m in entry["modules"]:
            end = start + ranks[m]
            scale = entry["strength"] * alphas[m] / ranks[m]
            tensors[f"{m}.{DOWN}"] = stack.tensors[f"{m}.{DOWN}"][start:end].to(dtypes[DOWN]).contiguous()
            up = stack.tensors[f"{m}.{UP}"][:, start:end].double() / scale
            tensors[f"{m}.{UP}"] = up.to(dtypes[UP]).contiguous()
            tensors[f"{m}.{ALPHA}"] = torch.tensor(alphas[m], dtype=dtypes[ALPHA])
        _check_other_blocks_are_zero(stack, entry, name)
        part = Part(StoredAdapter(tensors, dict(entry["metadata"])), entry["file"], entry["strength"])
        try:
            check_adapter(part.adapter, part.name)
        except AdapterFileError as error:
            raise AdapterFileError(f"{name}: its part {part.name} is damaged ({error})") from None
        parts.append(part)
    return parts


def _module_ranks(entry: dict) -> dict[str, int]:
    start, stop = entry["ranks"]
    return entry.get("module_ranks") or dict.fromkeys(entry["modules"], stop - start)


def _check_other_blocks_are_zero(stack: StoredAdapter, entry: dict, name: str) -> None:
    """Outside a part's own modules and ranks its block holds zeros (else the file was changed after stacking)."""
    start, stop = entry["ranks"]
    ranks = _module_ranks(entry)
    for key, tensor in stack.tensors.items():
        module, _, suffix = key.partition(".")
        if suffix == ALPHA:
            continue
        first = start + ranks.get(module, 0)
        block = tensor[first:stop] if suffix == DOWN else tensor[:, first:stop]
        if bool(block.any()):
            raise AdapterFileError(f"{name}: {key} holds values in the rank range of {entry['file']} beyond what "
                                   "that part adapts: the file was edited after stacking")


def remove(stack: StoredAdapter, concept: str, name: str = "stack") -> StoredAdapter:
    """The stack without the part that erases ``concept`` (or has that file name): the other parts merged again,
    exactly as merging them alone gives (a single part at strength 1 is its original file)."""
    if not stack.is_stack:
        raise AdapterFileError(f"{name} is not a stack of erasure adapters (no {STACK_KEY} metadata): there is "
                               "nothing to remove from it")
    parts = unstack(stack, name)
    wanted = (concept or "").strip().casefold()
    if not wanted:
        raise ValueError("concept: name the concept (or part file name) to remove")
    matches = [p for p in parts if wanted in (p.concept.strip().casefold(), p.name.casefold(),
                                              Path(p.name).stem.casefold())]
    listing = ", ".join(f"{p.concept!r} ({p.name})" for p in parts)
    if not matches:
        raise ValueError(f"{name} has no part {concept!r}; its parts: {listing}")
    if len(matches) > 1:
        raise ValueError(f"{concept!r} names several parts of {name} ({listing}): give the part's file name")
    rest = [p for p in parts if p is not matches[0]]
    if not rest:
        raise ValueError(f"{matches[0].concept!r} is the only part of {name}: nothing would remain")
    return merge(rest, allow_other_base=True)  # the parts were checked against each other when stacked


# ---------------------------------------------------------------------------- the stack record (untrusted text)

def _stack_record(stack: StoredAdapter, name: str) -> dict:
    try:
        record = json.loads(stack.metadata[STACK_KEY])
        _check_record(record, stack)
    except (ValueError, KeyError, TypeError, IndexError, RecursionError) as error:
        raise AdapterFileError(f"{name}: its stack record ({STACK_KEY}) is damaged: {error}") from None
    return record


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} is not a finite number")
    return value


def _check_record(record, stack: StoredAdapter) -> None:
    if not isinstance(record, dict) or record.get("version") != STACK_VERSION:
        raise ValueError(f"unknown stack version (this reader knows version {STACK_VERSION})")
    parts, rank = record["parts"], record["rank"]
    if not isinstance(parts, list) or not parts:
        raise ValueError("no parts")
    modules = {key.partition(".")[0] for key in stack.tensors}
    file_rank = stack.tensors[f"{next(iter(modules))}.{DOWN}"].shape[0]
    if rank != file_rank:
        raise ValueError(f"it records rank {rank}, the tensors have rank {file_rank}")
    start = 0
    for entry in parts:
        if not isinstance(entry, dict):
            raise ValueError("a part is not an object")
        stop = entry["ranks"][1]
        if entry["ranks"] != [start, stop] or isinstance(stop, bool) or not isinstance(stop, int) or stop <= start:
            raise ValueError(f"part {entry.get('file')!r}: rank ranges must follow each other from 0")
        start = stop
        if _number(entry["strength"], "strength") == 0:
            raise ValueError("a strength is 0")
        if not isinstance(entry["file"], str) or not isinstance(entry["concept"], str):
            raise ValueError("a part's file or concept is not text")
        listed = entry["modules"]
        if not isinstance(listed, list) or not listed or not set(listed) <= modules or len(set(listed)) != len(listed):
            raise ValueError(f"part {entry['file']!r}: its modules are not modules of the file")
        alpha = entry["alpha"]
        alphas = alpha.values() if isinstance(alpha, dict) else [alpha]
        if isinstance(alpha, dict) and set(alpha) != set(listed):
            raise ValueError(f"part {entry['file']!r}: alphas do not match its modules")
        for value in alphas:
            _number(value, "alpha")
        module_ranks = entry.get("module_ranks", dict.fromkeys(listed, stop - entry["ranks"][0]))
        width = stop - entry["ranks"][0]
        if not isinstance(module_ranks, dict) or set(module_ranks) != set(listed) or not all(
                isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= width for r in module_ranks.values()):
            raise ValueError(f"part {entry['file']!r}: its module ranks do not fit its rank range")
        dtypes = entry["dtypes"]
        if not isinstance(dtypes, dict) or any(dtypes.get(s) not in _DTYPES for s in (DOWN, UP, ALPHA)):
            raise ValueError(f"part {entry['file']!r}: unknown stored dtypes")
        metadata = entry["metadata"]
        if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in metadata.items()):
            raise ValueError(f"part {entry['file']!r}: its metadata is not text")
        if STACK_KEY in metadata:
            raise ValueError(f"part {entry['file']!r} is itself a stack")
    if start != rank:
        raise ValueError(f"the parts' rank ranges end at {start}, the stack's rank is {rank}")
