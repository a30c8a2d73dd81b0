"""Files users share: erasure adapters (kohya text-encoder LoRA, optionally with the UNet's cross-attention
key/value edit as kohya ``lora_unet_*attn2_to_k/to_v`` keys beside it) and concept tokens.

Written atomically, never silently overwritten; read with safetensors only and validated
(keys, shapes, base model) before anything uses them.
"""
from __future__ import annotations

import errno
import json
import math
import os
import stat
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .backend import Backend
from .kv_edit import KOHYA_PREFIX as UNET_PREFIX
from .kv_edit import KVDeltas, kv_modules, name_from_kohya
from .lora import Deltas
from .targets import ATTENTION, Target
from .tokens import ConceptToken, check_token_is_not_a_word, check_token_name

FORMAT_VERSION = "1"
NAMESPACE = "concept_unlearn"
_LORA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")
_FULL_SUFFIXES = ("diff",)
# what hosts load and torch computes with everywhere (float8 has no isfinite, no CPU matmul in most torch builds)
_STORED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class AdapterFileError(ValueError):
    """A file that is not a usable adapter or token, or does not fit the loaded model."""


# ---------------------------------------------------------------------------- base model fingerprint

_PROBE_ROWS = (1, 320, 1125, 2368, 49406, 49407)


def base_fingerprint(backend: Backend) -> dict:
    """A few fixed weights of the text encoder, robust to fp16/bf16 casting (compared with tolerance)."""
    embedding = backend.token_embedding().weight
    rows = [r for r in _PROBE_ROWS if r < embedding.shape[0]]
    probe = embedding[rows, :4].detach().float().flatten().tolist()
    for target in (Target(0, "fc1"), Target(backend.num_layers - 1, "fc2")):
        probe += backend.linear(target).weight[:2, :4].detach().float().flatten().tolist()
    return {"width": int(backend.width), "layers": int(backend.num_layers), "probe": [round(v, 6) for v in probe]}


def _is_number(value) -> bool:
    """A finite JSON number that torch can hold (json reads integers of any size)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return abs(value) < 2 ** 53 if isinstance(value, int) else math.isfinite(value)


def _well_formed_fingerprint(fingerprint) -> bool:
    if not isinstance(fingerprint, dict):
        return False
    probe = fingerprint.get("probe", [])
    sizes = [fingerprint.get(key, 0) for key in ("width", "layers")]
    return isinstance(probe, list) and all(_is_number(v) for v in probe + sizes)


def parse_fingerprint(raw: str | None, name: str = "file") -> dict | None:
    """The fingerprint recorded in a file's metadata (untrusted text), or None when there is none."""
    if not raw:
        return None
    try:
        fingerprint = json.loads(raw)
    except (ValueError, RecursionError):
        fingerprint = None
    if not _well_formed_fingerprint(fingerprint):
        raise AdapterFileError(f"{name}: its base-model fingerprint metadata is damaged; "
                               "re-save the file or allow other bases (--force-base)")
    return fingerprint


def fingerprints_match(a: dict, b: dict) -> bool:
    if a.get("width") != b.get("width") or a.get("layers") != b.get("layers"):
        return False
    pa, pb = torch.tensor(a.get("probe", [])), torch.tensor(b.get("probe", []))
    return pa.shape == pb.shape and bool(torch.allclose(pa, pb, rtol=2e-2, atol=2e-3))


# ---------------------------------------------------------------------------- writing

def _exists_error(path: Path) -> FileExistsError:
    return FileExistsError(f"{path} already exists: choose another name or pass overwrite (--force)")


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move the finished temp file to ``path``. Without ``overwrite`` this never replaces a file, even one that
    another run wrote a moment ago: a hard link fails on an existing target (an exclusive create where the file
    system has no hard links)."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise _exists_error(path) from None
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV):
            raise
        try:  # no hard links here: claim the name exclusively, then fill it
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            raise _exists_error(path) from None
        os.replace(tmp, path)


def atomic_save(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str], overwrite: bool) -> Path:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise AdapterFileError(f"{path}: the file name must end in .safetensors")
    if path.is_dir():
        raise AdapterFileError(f"{path} is a folder: give a file name ending in .safetensors")
    if path.exists() and not overwrite:
        raise _exists_error(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.stem}.{uuid.uuid4().hex}.tmp"
    # the usual mode for a new file (0666 less the umask), which save_file does not keep: model folders are
    # often shared between users
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    usual_mode = stat.S_IMODE(os.stat(tmp).st_mode)
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, usual_mode)
        _publish(tmp, path, overwrite)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def adapter_metadata(deltas: Deltas, fingerprint: dict | None, info: dict,
                     unet: KVDeltas | None = None) -> dict[str, str]:
    """kohya's ss_* keys (what hosts read) + our namespaced keys (``info`` e.g. concept, method, steps); with a
    UNet key/value edit, ``concept_unlearn.unet_kv_edit`` records its projections, rank and SVD error."""
    full = deltas.mode == "full"
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": "full" if full else str(deltas.rank),
        # modules with their own alphas (a file made elsewhere, re-saved): kohya's resize_lora writes "Dynamic"
        "ss_network_alpha": "full" if full else ("Dynamic" if deltas.uniform_alpha is None else f"{deltas.alpha:g}"),
        "ss_v2": "True",
        "ss_base_model_version": "sd_v2",
        f"{NAMESPACE}.format_version": FORMAT_VERSION,
        f"{NAMESPACE}.mode": deltas.mode,
    }
    if fingerprint:
        metadata[f"{NAMESPACE}.base_fingerprint"] = json.dumps(fingerprint)
    if unet is not None:
        metadata[f"{NAMESPACE}.unet_kv_edit"] = json.dumps({
            "projections": len(unet.names), "rank": unet.rank,
            "max_svd_error": round(max(unet.errors.values()), 6) if unet.errors else None})
    for key, value in info.items():
        metadata[f"{NAMESPACE}.{key}"] = value if isinstance(value, str) else json.dumps(value)
    return metadata


def check_finite_as_written(tensors: dict[str, torch.Tensor], name: str) -> None:
    """Refuse tensors that are not finite in the dtype they are stored in (float16 ends at 65504)."""
    for key, tensor in tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            raise AdapterFileError(
                f"{name}: {key} does not fit {str(tensor.dtype).removeprefix('torch.')} (inf or NaN): the training "
                "diverged or its values are too large; lower the learning rate (--lr) or alpha, or use fewer steps. "
                "Nothing was written")


def write_adapter(path, deltas: Deltas, fingerprint: dict | None, info: dict | None = None,
                  overwrite: bool = False, dtype: torch.dtype = torch.float16, unet: KVDeltas | None = None) -> Path:
    """The text-encoder deltas (and ``unet``, the UNet key/value edit, when given) as one kohya LoRA file."""
    tensors = deltas.to_kohya(dtype) | (unet.to_kohya(dtype) if unet is not None else {})
    check_finite_as_written(tensors, Path(path).name)
    return atomic_save(tensors, path, adapter_metadata(deltas, fingerprint, info or {}, unet), overwrite)


def write_token(path, token: ConceptToken, fingerprint: dict | None = None, overwrite: bool = False) -> Path:
    metadata = {f"{NAMESPACE}.format_version": FORMAT_VERSION, f"{NAMESPACE}.token": token.name}
    if fingerprint:
        metadata[f"{NAMESPACE}.base_fingerprint"] = json.dumps(fingerprint)
    vectors = token.vectors.detach().float().contiguous().cpu()
    check_finite_as_written({"emb_params": vectors}, Path(path).name)
    return atomic_save({"emb_params": vectors}, path, metadata, overwrite)


# ---------------------------------------------------------------------------- reading

def _read(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as error:  # safetensors' error types differ between versions (0.3 in A1111's venv)
        raise AdapterFileError(f"{path} is not a readable .safetensors file (corrupted or truncated?): {error}") from None
    return tensors, metadata


@dataclass
class AdapterFile:
    deltas: Deltas
    metadata: dict[str, str]
    notes: list[str] = field(default_factory=list)  # what a user should know (e.g. an unchecked base model)
    unet: KVDeltas | None = None  # the UNet cross-attention key/value edit, when the file carries one

    def info(self, key: str, default=None):
        return self.metadata.get(f"{NAMESPACE}.{key}", default)

    @property
    def fingerprint(self) -> dict | None:
        return parse_fingerprint(self.info("base_fingerprint"))


def split_unet(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(text-encoder tensors, UNet ``lora_unet_*`` tensors) of an adapter file."""
    unet = {k: v for k, v in tensors.items() if k.startswith(UNET_PREFIX)}
    return {k: v for k, v in tensors.items() if k not in unet}, unet


def _check_stored(tensor: torch.Tensor, key: str, name: str) -> None:
    if tensor.dtype not in _STORED_DTYPES:
        raise AdapterFileError(f"{name}: {key} is stored as {str(tensor.dtype).removeprefix('torch.')}; "
                               "adapters hold float16, bfloat16 or float32 tensors: re-save it in one of those")
    if not bool(torch.isfinite(tensor).all()):
        raise AdapterFileError(f"{name}: {key} holds inf or NaN values: the file is damaged or its training "
                               "diverged; train it again with a lower learning rate")


def validate_unet_tensors(tensors: dict[str, torch.Tensor], name: str = "adapter") -> None:
    """UNet keys may only be LoRA (down/up/alpha) on cross-attention to_k/to_v, each module complete."""
    groups: dict[str, set[str]] = {}
    for key, tensor in tensors.items():
        base, _, suffix = key.partition(".")
        try:
            name_from_kohya(base)
        except ValueError:
            raise AdapterFileError(f"{name}: unexpected key {key!r}; the only UNet keys an erasure adapter holds are "
                                   "its cross-attention key/value edit (lora_unet_..._attn2_to_k / to_v)") from None
        if suffix not in _LORA_SUFFIXES:
            raise AdapterFileError(f"{name}: unexpected key {key!r} (UNet edits are LoRA: lora_down/lora_up/alpha)")
        _check_stored(tensor, key, name)
        groups.setdefault(base, set()).add(suffix)
    for base, suffixes in groups.items():
        if suffixes != set(_LORA_SUFFIXES):
            raise AdapterFileError(f"{name}: {base} needs lora_down.weight, lora_up.weight and alpha")
        down, up = tensors[f"{base}.lora_down.weight"], tensors[f"{base}.lora_up.weight"]
        if (down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1] or down.shape[0] < 1
                or tensors[f"{base}.alpha"].numel() != 1):
            raise AdapterFileError(f"{name}: {base} has inconsistent LoRA shapes {tuple(down.shape)} / {tuple(up.shape)}")


def validate_adapter_tensors(tensors: dict[str, torch.Tensor], name: str = "adapter") -> None:
    if not tensors:
        raise AdapterFileError(f"{name} holds no tensors")
    tensors, unet = split_unet(tensors)
    validate_unet_tensors(unet, name)
    if not tensors:
        raise AdapterFileError(f"{name} holds UNet keys only; an erasure adapter holds text-encoder LoRA keys "
                               "(lora_te_text_model_encoder_layers_N_...), with any UNet edit beside them")
    groups: dict[str, set[str]] = {}
    for key, tensor in tensors.items():
        base, _, suffix = key.partition(".")
        try:
            Target.from_kohya(base)
        except ValueError:
            raise AdapterFileError(f"{name}: unexpected key {key!r}; an erasure adapter holds only "
                                   "text-encoder LoRA keys (lora_te_text_model_encoder_layers_N_...)") from None
        if suffix not in _LORA_SUFFIXES + _FULL_SUFFIXES:
            raise AdapterFileError(f"{name}: unexpected key {key!r}")
        _check_stored(tensor, key, name)
        groups.setdefault(base, set()).add(suffix)
    kinds = {frozenset(s) for s in groups.values()}
    if kinds not in ({frozenset(_LORA_SUFFIXES)}, {frozenset(_FULL_SUFFIXES)}):
        raise AdapterFileError(f"{name}: every module needs either lora_down/lora_up/alpha or diff, not a mix")
    ranks = set()
    for base, suffixes in groups.items():
        if "diff" in suffixes:
            if tensors[f"{base}.diff"].ndim != 2:
                raise AdapterFileError(f"{name}: {base}.diff must be a matrix")
            continue
        down, up = tensors[f"{base}.lora_down.weight"], tensors[f"{base}.lora_up.weight"]
        if (down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1] or down.shape[0] < 1
                or tensors[f"{base}.alpha"].numel() != 1):
            raise AdapterFileError(f"{name}: {base} has inconsistent LoRA shapes {tuple(down.shape)} / {tuple(up.shape)}")
        ranks.add(down.shape[0])
    layers = {Target.from_kohya(b).layer for b in groups}
    for layer in layers:
        attention = {Target.from_kohya(b).proj for b in groups if Target.from_kohya(b).layer == layer} & set(ATTENTION)
        if attention and attention != set(ATTENTION):
            raise AdapterFileError(f"{name}: layer {layer} adapts only {sorted(attention)} of q/k/v/out; "
                                   "hosts need all four attention projections")
    if len(ranks) > 1:
        raise AdapterFileError(f"{name}: mixed LoRA ranks {sorted(ranks)} are not supported")


NO_FINGERPRINT_NOTE = ("{name} records no base-model fingerprint, so whether it was made for this model cannot be "
                       "checked: use it only with the model it was trained on")


def check_against_backend(deltas: Deltas, metadata: dict[str, str], backend: Backend, name: str,
                          allow_other_base: bool) -> list[str]:
    """Refuse an adapter that does not fit the model; return notes (e.g. that the base could not be checked)."""
    for t in deltas.targets:
        if t.layer >= backend.num_layers:
            raise AdapterFileError(f"{name} adapts layer {t.layer}, but this model's conditioning uses layers "
                                   f"0..{backend.num_layers - 1}: it was made for another model")
        expected = tuple(backend.linear(t).weight.shape)
        if deltas.shapes[t] != expected:
            raise AdapterFileError(f"{name}: {t} has shape {deltas.shapes[t]}, this model's is {expected}: "
                                   "the adapter was made for another model")
    if allow_other_base:
        return []
    recorded = parse_fingerprint(metadata.get(f"{NAMESPACE}.base_fingerprint"), name)
    if recorded is None:
        return [NO_FINGERPRINT_NOTE.format(name=name)]
    if not fingerprints_match(recorded, base_fingerprint(backend)):
        raise AdapterFileError(f"{name} was made for another base model (its text-encoder fingerprint differs); "
                               "use it with the model it was made for, or allow other bases (--force-base)")
    return []


def check_unet_against_backend(unet: KVDeltas, backend: Backend, name: str) -> list[str]:
    """Refuse UNet keys that this model lacks or whose shapes differ; a note where the host cannot say."""
    try:
        modules = kv_modules(backend)
    except ValueError:
        return [f"{name} also edits the UNet's cross-attention keys/values, which this host's loader applies; "
                "their shapes could not be checked here"]
    for module_name, shape in unet.shapes.items():
        if module_name not in modules:
            raise AdapterFileError(f"{name} edits {module_name}, which this model's UNet does not have: "
                                   "the adapter was made for another model")
        expected = tuple(modules[module_name].weight.shape)
        if shape != expected:
            raise AdapterFileError(f"{name}: {module_name} has shape {shape}, this model's is {expected}: "
                                   "the adapter was made for another model")
    return []


def _check_marked_for_sd2(metadata: dict[str, str], name: str) -> None:
    if metadata.get("ss_v2", "True") not in ("True", "true") or metadata.get("ss_base_model_version", "sd_v2") not in ("sd_v2", "sd_2.1", "sd_2.0"):
        raise AdapterFileError(f"{name} is marked for {metadata.get('ss_base_model_version')}, not Stable Diffusion 2.x")


def read_adapter(path, backend: Backend | None = None, allow_other_base: bool = False) -> AdapterFile:
    """Read and validate an adapter; with a backend, also check it fits that model."""
    tensors, metadata = _read(path)
    name = Path(path).name
    validate_adapter_tensors(tensors, name)
    _check_marked_for_sd2(metadata, name)
    text_tensors, unet_tensors = split_unet(tensors)
    deltas = Deltas.from_kohya(text_tensors)
    unet = KVDeltas.from_kohya(unet_tensors) if unet_tensors else None
    notes = []
    if backend is not None:
        notes = check_against_backend(deltas, metadata, backend, name, allow_other_base)
        if unet is not None:
            notes += check_unet_against_backend(unet, backend, name)
    return AdapterFile(deltas, metadata, notes, unet)


def read_token(path, backend: Backend | None = None, name: str | None = None) -> ConceptToken:
    """A concept token file (``emb_params`` [n, width]); ``name`` defaults to the file's stem."""
    tensors, metadata = _read(path)
    file = Path(path).name
    if list(tensors) != ["emb_params"]:
        raise AdapterFileError(f"{file}: a concept token file holds exactly one tensor 'emb_params', found {sorted(tensors)}")
    vectors = tensors["emb_params"].float()
    if vectors.ndim == 1:
        vectors = vectors.unsqueeze(0)
    if vectors.ndim != 2 or not bool(torch.isfinite(vectors).all()):
        raise AdapterFileError(f"{file}: emb_params must be a finite [n_vectors, width] tensor, got {tuple(vectors.shape)}")
    if backend is not None and vectors.shape[1] != backend.width:
        raise AdapterFileError(f"{file} has {vectors.shape[1]}-wide vectors, this model's text encoder is "
                               f"{backend.width} wide: the token was made for another model")
    token_name = name or metadata.get(f"{NAMESPACE}.token") or Path(path).stem
    try:
        check_token_is_not_a_word(check_token_name(token_name))
    except ValueError as error:
        raise AdapterFileError(f"{file}: {error}") from None
    return ConceptToken(token_name, vectors)


_MAX_METADATA_DEPTH = 32


def _nesting_depth(value) -> int:
    """How deeply lists/dicts nest in a decoded JSON value (iterative: untrusted values may nest very deeply)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _decoded_metadata_value(key: str, value: str):
    """Our own keys hold JSON (lists, numbers); anything else, undecodable or absurdly nested, stays as text."""
    if not key.startswith(NAMESPACE):
        return value
    try:
        decoded = json.loads(value)
    except (ValueError, RecursionError):  # plain strings (concept, method, ...) are stored as they are
        return value
    return value if _nesting_depth(decoded) > _MAX_METADATA_DEPTH else decoded


def _problem(tensors: dict[str, torch.Tensor], metadata: dict[str, str], name: str) -> tuple[str, str | None]:
    """(kind, None) for a valid adapter or token, else ("unusable", what is wrong)."""
    if list(tensors) == ["emb_params"]:
        vectors = tensors["emb_params"]
        usable = vectors.dtype in _STORED_DTYPES and vectors.ndim in (1, 2) and bool(torch.isfinite(vectors).all())
        return ("concept token", None) if usable else (
            "unusable", f"{name}: emb_params must be a finite float [n_vectors, width] tensor")
    try:
        validate_adapter_tensors(tensors, name)
        _check_marked_for_sd2(metadata, name)
        parse_fingerprint(metadata.get(f"{NAMESPACE}.base_fingerprint"), name)
    except AdapterFileError as error:
        return "unusable", str(error)
    return "erasure adapter", None


def inspect(path) -> dict:
    """Metadata and tensor summary of an adapter or token file, for humans (``concept-unlearn inspect``).
    ``kind`` is "erasure adapter" or "concept token" only for files that pass validation; otherwise it is
    "unusable" and ``problem`` says why."""
    tensors, metadata = _read(path)
    decoded = {key: _decoded_metadata_value(key, value) for key, value in metadata.items()}
    kind, problem = _problem(tensors, metadata, Path(path).name)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    summary = {"file": str(path), "kind": kind, "tensors": len(tensors), "bytes": size, "metadata": decoded}
    if kind == "erasure adapter":
        text_tensors, unet_tensors = split_unet(tensors)
        summary["modules"] = {"text_encoder": len({k.partition(".")[0] for k in text_tensors}),
                              "unet_cross_attention_kv": len({k.partition(".")[0] for k in unet_tensors})}
    if problem:
        summary["problem"] = problem
    return summary
