"""What the Concept Unlearn tab does, without gradio or A1111: each button is one function over a ``Host``.

``Host`` carries what the functions need from A1111 (the model, folders, shared.state, queue lock, flags); the
tab builds it from ``modules.shared`` (see ``a1111_host``), tests build it around a small model. Every button
function returns (message, saved file or None, loss curve or None) and turns expected failures into one line:
what is wrong, what to do. No gradio or ``modules.*`` import at load (A1111 loads this file as a script too;
it registers nothing: the tab file concept_unlearn_tab.py does).
"""
# no ``from __future__ import annotations``: A1111 loads this file without a sys.modules entry, and dataclasses
# look string annotations up in sys.modules (AttributeError on load)
import re
import sys
import traceback
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

# Loading: this file is loaded through the backend file's loader (``sibling("logic")``: the tab, tests), after the
# backend has registered itself and the engine ``unlearn_core``. A1111 also runs every scripts/*.py on its own, in
# alphabetical order, so this file after concept_unlearn_a1111_backend.py, which has registered the engine by then;
# that copy only defines names and is not used.
from unlearn_core import Cancelled, EraseConfig, LoraConfig, TokenConfig, erase, learn_token
from unlearn_core.adapter_io import (AdapterFileError, base_fingerprint, read_adapter, read_token,
                                     write_adapter, write_token)
from unlearn_core.backend import UnsupportedModelError
from unlearn_core.images import ImageInputError, prepare
from unlearn_core.methods import ROBUST_ROUNDS, method_config
from unlearn_core.plots import loss_curve
from unlearn_core import kv_edit, stacking
from unlearn_core.continual import check_config, check_earlier, grown, read_earlier, undoing_each_other
from unlearn_core.tokens import token_file_stem

BACKEND = "concept_unlearn_a1111_backend"  # registered by the tab (and tests) before they load this file
METHODS = {"Contextual (default; images optional, no UNet pass)": "contextual",
           "Weighted (images + anchor, seed 000)": "weighted", "Few-shot (images, gradient ascent)": "fewshot",
           "Anchor (no images needed)": "anchor",
           "Few-shot, paper settings (10 steps, lr 1e-5, full weights saved as a rank-R LoRA by SVD)": "fewshot-paper"}
PRESETS = {"Method default (contextual: first layer's MLP; the others: few-shot layers)": None,
           "Few-shot layers (MLP of all + last attention)": "fewshot", "First layer's MLP": "first",
           "Last layer": "final", "All layers": "all"}
EXPECTED = (ValueError, UnsupportedModelError, FileExistsError, AdapterFileError, ImageInputError, OSError)
OUTPUTS = 3  # (message, saved path, loss curve)
JOB = "concept_unlearn"  # shared.state.job while one of our buttons runs


@dataclass
class Host:
    sd_model: Any
    lora_dir: Path
    embeddings_dir: Path
    state: Any = None  # A1111's shared.state (job, interrupted, skipped, sampling_step(s), textinfo, begin, end)
    lock: Any = None  # A1111's call_queue.queue_lock: held for the run, as A1111 holds it for generation/training
    prepare: Callable[[], Any] | None = None  # context around the run (A1111: undo cross-attention optimizations)
    lowvram: bool = False
    medvram: bool = False
    autocast: Callable | None = None
    tokenizer: Callable | None = None  # only for models without A1111's hijack (tests)
    resolution: int = 512
    overwrite: bool = False
    lr: float | None = None
    extra: dict = field(default_factory=dict)

    def backend(self):
        return sys.modules[BACKEND].A1111Backend(self.sd_model, lowvram=self.lowvram, medvram=self.medvram,
                                           tokenizer=self.tokenizer, autocast=self.autocast,
                                           latent_size=self.resolution // 8)


def _job_name(state) -> str:
    return getattr(state, "job", "") if state is not None else ""


def busy(state) -> str | None:
    """Why a button must wait, or None (checked when it is pressed, behind the tab's live ``availability``).
    A1111 sets state.job while any job (txt2img, train...) runs."""
    job = _job_name(state)
    if job:
        return f"another job ({job}) is running: wait for it to finish or interrupt it, then press the button again"
    return None


def availability(state, lock=None) -> tuple[str, bool]:
    """The tab's status line and whether its Learn Token / Erase / Audit buttons can be pressed now.

    The tab polls this every few seconds (Interrupt is not among what it switches: it stays enabled always).
    Our own run (job ``JOB``) shows its step; any other A1111 job (``state.job`` set: txt2img, train...) or a held
    queue lock with no job (e.g. a checkpoint loading) disables the buttons with why, until it ends. ``lock``:
    A1111's queue_lock, read through its ``locked()`` only (never acquired here)."""
    job = _job_name(state)
    if job == JOB:
        step = getattr(state, "textinfo", None) or "starting"
        return f"Concept Unlearn is running: {step} (Interrupt stops it and saves nothing)", False
    if job:
        what = "another job" if job == "(unknown)" else job  # A1111's begin() default name
        return f"AUTOMATIC1111 is busy with {what}: the buttons come back when it finishes", False
    locked = getattr(lock, "locked", None)
    if callable(locked) and locked():
        return "AUTOMATIC1111 is busy with a queued task: the buttons come back when it finishes", False
    return "Ready", True


def split_list(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for line in (text or "").splitlines() for p in line.split(",") if p.strip())


def file_stem(text: str, prefix: str = "unlearn_") -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", (text or "").strip()).strip("._")
    if not stem:
        raise ValueError("name: give the concept (or an adapter name) using letters or digits")
    return stem if stem.startswith(prefix) else prefix + stem


def list_files(folder) -> list[str]:
    """Names (relative to ``folder``, without .safetensors) of the safetensors files there, for the tab's lists."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.safetensors"))


def find_file(text: str, folder, what: str) -> Path | None:
    """A file of ``folder`` named by ``text`` (a name as ``list_files`` gives, a file name, or a path inside it)."""
    text = (text or "").strip()
    if not text:
        return None
    folder = Path(folder).resolve()
    base = text[:-len(".safetensors")] if text.endswith(".safetensors") else text
    if "/" not in base and "\\" not in base:
        base = base.strip("<>")  # a token typed as <name>
    name = base + ".safetensors"
    candidate = (folder / name).resolve()
    if folder not in candidate.parents:
        raise ValueError(f"{what}: {text!r} is not inside {folder}")
    if candidate.is_file():
        return candidate
    matches = sorted(folder.rglob(Path(name).name)) if folder.is_dir() else []
    if matches:
        return matches[0]
    raise FileNotFoundError(f"{what}: no {Path(name).name} in {folder}")


def gallery_images(items, size: int) -> torch.Tensor:
    """Uploaded images (gradio File paths / tempfile objects / dicts / PIL images) -> [N, 3, size, size]."""
    from PIL import Image

    tensors = []
    for item in items or []:
        if isinstance(item, (list, tuple)):
            item = item[0]
        if isinstance(item, dict):
            item = item.get("name") or item.get("path")
        item = getattr(item, "name", item)
        if isinstance(item, (str, Path)):
            try:
                with Image.open(item) as picture:
                    picture.load()
                    tensor, _ = prepare(picture, size, Path(item).name)
            except OSError:
                raise ImageInputError(f"cannot read image {Path(item).name}: upload PNG/JPEG/WebP files") from None
        else:
            tensor, _ = prepare(item, size)
        tensors.append(tensor)
    if not tensors:
        raise ImageInputError("no example images: upload 4-5 images of the concept (or use the Anchor method)")
    return torch.stack(tensors)


def callback_for(state, progress=None, title: str = ""):
    """Engine callback: A1111's progress fields, an optional gradio progress, and A1111's Interrupt button."""
    def callback(info):
        if state is not None:
            state.sampling_steps, state.sampling_step = info.total, info.step
            state.textinfo = f"{title} {info.step}/{info.total}"
        if progress is not None:
            progress((info.step, info.total), desc=title)
        if state is not None and (getattr(state, "interrupted", False) or getattr(state, "skipped", False)):
            raise Cancelled("interrupted")
    return callback


class _Job:
    """shared.state.begin/end around the run (``begin`` clears a stale Interrupt, ``job`` makes others wait)."""

    def __init__(self, state, name: str):
        self.state, self.name = state, name

    def __enter__(self):
        if self.state is not None and hasattr(self.state, "begin"):
            self.state.begin(job=self.name)
        return self

    def __exit__(self, *exc):
        if self.state is not None and hasattr(self.state, "end"):
            self.state.end()
        return False


def _failure(message: str) -> tuple:
    return (message,) + (None,) * (OUTPUTS - 1)


def _guard(fn):
    """Busy check, queue lock, shared.state job and ``prepare`` around a button; failures become one line."""
    def run(host: Host, *args, **kwargs):
        waiting = busy(host.state)
        if waiting:
            return _failure(f"Busy: {waiting}")
        if host.lock is not None and not host.lock.acquire(blocking=False):
            return _failure("Busy: AUTOMATIC1111 is generating or training: wait for it to finish, then press the "
                            "button again")
        try:
            with _Job(host.state, JOB), (host.prepare or nullcontext)():
                return fn(host, *args, **kwargs)
        except Cancelled:
            return _failure("Interrupted: nothing was saved and the model is unchanged.")
        except EXPECTED as error:
            return _failure(f"Error: {_line(error)}")
        except RuntimeError as error:  # e.g. CUDA out of memory: one line here, the details in the console
            traceback.print_exc()
            return _failure(f"Error: {_line(error)} (details in the console)")
        finally:
            if host.lock is not None:
                host.lock.release()
    run.__name__, run.__doc__ = fn.__name__, fn.__doc__
    return run


def _line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def erase_config(host: Host, concept: str, synonyms: str, method_label: str, preset_label: str, steps: int,
                 rank: int, seed: int, kind: str = "object", anchor: str = "", preserve: str = "",
                 keep: str = "", contexts: str = "", robust: bool = False, unet_kv_edit: bool = True) -> EraseConfig:
    """The engine's method table decides; the paper preset keeps its own layers, steps and lr (the Layers and
    Steps inputs are not used) and saves its full-weight deltas at the Rank slider's rank by SVD."""
    prompts = split_list(preserve)
    return method_config(METHODS.get(method_label, method_label), concept or "", synonyms=split_list(synonyms),
                         kind=kind or "object", anchor=(anchor or "").strip() or None, steps=int(steps),
                         seed=int(seed), preset=PRESETS.get(preset_label, preset_label), rank=int(rank),
                         preserve=prompts + ("",) if prompts else None, keep=split_lines(keep),
                         contexts=split_lines(contexts), lr=host.lr or None,
                         adversarial_rounds=ROBUST_ROUNDS if robust else None,
                         unet_kv_edit=bool(unet_kv_edit))


def split_lines(text: str) -> tuple[str, ...]:
    return tuple(line.strip() for line in (text or "").splitlines() if line.strip())


@_guard
def do_erase(host: Host, images, concept: str, synonyms: str, token: str, method_label: str,
             preset_label: str, steps: int, rank: int, seed: int, name: str = "", progress=None,
             kind: str = "object", anchor: str = "", preserve: str = "", keep: str = "", contexts: str = "",
             robust: bool = False, unet_kv_edit: bool = True, erase_after: str = ""):
    """Train an erasure adapter and save it to models/Lora. Returns (message, adapter path, loss curve).

    ``erase_after`` (contextual; continual erasure): an earlier erasure adapter or stack, a name or file in
    models/Lora. The new concept is erased on the model with it applied (its concepts kept erased) and the saved
    file is the earlier one with the new adapter stacked on (it grows by concept; Remove takes one out again);
    the earlier file is not changed.

    ``unet_kv_edit`` (contextual): the UNet key/value edit is written into the same file (lora_unet_* keys, which
    A1111's Lora extension applies to the UNet with the same <lora:name:1>)

    ``token``: optional concept token, a name or file in embeddings/ (its vectors join the erase prompts)."""
    config = erase_config(host, concept, synonyms, method_label, preset_label, steps, rank, seed, kind, anchor,
                          preserve, keep, contexts, robust, unet_kv_edit)
    stem = file_stem(name or config.concept)
    path = Path(host.lora_dir) / f"{stem}.safetensors"
    if path.exists() and not host.overwrite:
        raise FileExistsError(f"{path.name} already exists in {path.parent}: choose another name "
                              "(or allow overwriting in Settings > Concept Unlearn)")
    token_file = find_file(token, host.embeddings_dir, "concept token")
    earlier, earlier_file = _earlier(host, erase_after, config)  # read and checked before the model is touched
    pictures = gallery_images(images, host.resolution) if config.needs_images else None
    backend = host.backend()
    concept_token = read_token(token_file, backend) if token_file else None
    if earlier is not None:  # made for this model (fingerprint, shapes), or refused before training
        check_earlier(earlier, backend)
    with backend.session():
        result = erase(backend, config, images=pictures, token=concept_token,
                       callback=callback_for(host.state, progress, "Erase"), earlier=earlier or ())
    if earlier is not None:  # the earlier file with the new part stacked on: one file that grows by concept
        stacked = grown(earlier, result, base_fingerprint(backend), path.name)
        stacking.write(path, stacked, overwrite=host.overwrite)
        kept = "" if path.resolve() == earlier_file.resolve() else f"; {earlier.name} is unchanged"
        return (f"Saved {path.name} ({result.seconds:.0f} s), {earlier.name} with the new erasure stacked on: "
                f"{_stack_summary(stacked)}. Use <lora:{stem}:1> in a prompt (refresh the Lora tab){kept}.",
                str(path), loss_curve(result.history, f"erase {config.concept}"))
    write_adapter(path, result.deltas, base_fingerprint(backend), result.info(), overwrite=host.overwrite,
                  unet=result.unet_deltas)
    paper = (f" Paper settings: {config.steps} steps at lr {config.lr:g} (the Layers and Steps inputs are not used); the full-"
             f"weight deltas were saved as a rank-{config.lora.compress_rank} LoRA by SVD (the Rank slider)."
             if METHODS.get(method_label, method_label) == "fewshot-paper" else "")
    return (f"Saved {path.name} ({result.seconds:.0f} s): use <lora:{stem}:1> in a prompt (refresh the Lora tab)."
            + paper, str(path), loss_curve(result.history, f"erase {config.concept}"))


NO_EARLIER = "none"  # the tab's "erase after" choice for a plain (not continual) erasure


def _earlier(host: Host, erase_after: str, config: EraseConfig):
    """(the earlier adapter chosen in "erase after" (continual.read_earlier), its file), or (None, None) for a
    plain erasure."""
    if not (erase_after or "").strip() or erase_after.strip() == NO_EARLIER:
        return None, None
    check_config(config, "erase after", ": pick Contextual, or set 'Erase after' to none")
    earlier_file = find_file(erase_after, host.lora_dir, "erase after")
    return read_earlier(earlier_file), earlier_file


@_guard
def do_learn_token(host: Host, images, token_name: str, init_word: str, kind: str, steps: int, seed: int,
                   progress=None, n_vectors: int = 1):
    """Learn a concept token and save it to embeddings/. Returns (message, token path, loss curve)."""
    config = TokenConfig(token=(token_name or "").strip(), n_vectors=int(n_vectors),
                         init_word=(init_word or "object").strip(), kind=kind or "object", steps=int(steps),
                         seed=int(seed))
    stem = token_file_stem(config.token)  # A1111 names an embedding after its file
    path = Path(host.embeddings_dir) / f"{stem}.safetensors"
    if path.exists() and not host.overwrite:
        raise FileExistsError(f"{path.name} already exists in {path.parent}: choose another token name")
    pictures = gallery_images(images, host.resolution)
    backend = host.backend()
    with backend.session():
        result = learn_token(backend, pictures, config, callback=callback_for(host.state, progress, "Token"))
    write_token(path, result.token, base_fingerprint(backend), overwrite=host.overwrite)
    return (f"Saved {path.name}: write {stem} in prompts (A1111 loads embeddings/ by file name); pick it as the "
            "concept token to erase with it.", str(path), loss_curve(result.history, f"token {config.token}"))


@_guard
def do_audit(host: Host, images, adapter: str, steps: int, seed: int, progress=None):
    """Re-learning attack: learn a token for the images on the base model and on the erased one.

    If the erased model's token loss comes down to the base model's, the concept is recoverable by textual
    inversion (shallow erasure). Returns (message, None, loss curve of the attack on the erased model).
    ``adapter``: a name or file in models/Lora."""
    adapter_file = find_file(adapter, host.lora_dir, "adapter")
    if adapter_file is None:
        raise ValueError("adapter: pick an erasure adapter (a file in models/Lora) to audit")
    pictures = gallery_images(images, host.resolution)
    backend = host.backend()
    loaded = read_adapter(adapter_file, backend)
    config = TokenConfig(token="<audit>", steps=int(steps), seed=int(seed))
    with backend.session():
        base = learn_token(backend, pictures, config, callback=callback_for(host.state, progress, "Audit base"))
        # the adapter is fixed during the attack: no gradients for it (a full .diff adapter's would be ~0.8 GB)
        with loaded.deltas.to(backend.device).requires_grad_(False).inject(backend.linear), \
                kv_edit.applied(loaded.unet, backend):  # the file's UNet key/value edit too, as <lora:...> applies it
            attacked = learn_token(backend, pictures, config, callback=callback_for(host.state, progress, "Audit"))
    tail = max(1, len(base.history) // 5)
    b = sum(h["loss"] for h in base.history[-tail:]) / tail
    a = sum(h["loss"] for h in attacked.history[-tail:]) / tail
    verdict = "recoverable (shallow erasure)" if a <= b * 1.05 else "not recovered in this budget"
    return (f"Audit of {adapter_file.name}: re-learned token loss {a:.4f} on the erased model vs {b:.4f} on the "
            f"base model: {verdict}.", None, loss_curve(attacked.history, "re-learning attack on the erased model"))


def _files_only(fn):
    """Merging and removing read and write files only (no model, no job, no queue lock): failures become one line."""
    def run(host: Host, *args, **kwargs):
        try:
            return fn(host, *args, **kwargs)
        except EXPECTED as error:
            return _failure(f"Error: {_line(error)}")
    run.__name__, run.__doc__ = fn.__name__, fn.__doc__
    return run


def _strengths(text: str, count: int) -> list:
    values = split_list(text)
    if not values:
        return [1.0] * count
    if len(values) != count:
        raise ValueError(f"strengths: {len(values)} given for {count} adapter(s): give one per adapter, or none")
    try:
        return [float(v) for v in values]
    except ValueError:
        raise ValueError(f"strengths: {text!r} is not a comma-separated list of numbers") from None


def _stack_summary(adapter) -> str:
    if not adapter.is_stack:
        return f"the adapter of {adapter.info('concept') or 'its concept'}"
    parts = stacking.unstack(adapter)
    return ", ".join(p.concept if p.strength == 1 else f"{p.concept} x{p.strength:g}" for p in parts)


def _new_lora_path(host: Host, stem: str) -> Path:
    path = Path(host.lora_dir) / f"{stem}.safetensors"
    if path.exists() and not host.overwrite:
        raise FileExistsError(f"{path.name} already exists in {path.parent}: choose another name "
                              "(or allow overwriting in Settings > Concept Unlearn)")
    return path


@_files_only
def do_merge(host: Host, adapters, strengths: str = "", name: str = ""):
    """Stack adapters of models/Lora into one file whose effect is the sum of theirs. Returns (message, path, None).

    ``adapters``: names as ``list_files`` gives them (a list, or text with one per line / comma-separated)."""
    listed = adapters if isinstance(adapters, (list, tuple)) else split_list(adapters)
    names = [a.strip() for a in listed if a and a.strip()]
    if not names:
        raise ValueError("adapters: pick the erasure adapters (files in models/Lora) to stack")
    files = [find_file(n, host.lora_dir, "adapter") for n in names]
    stem = file_stem(name or "stack_" + "_".join(Path(n).stem.removeprefix("unlearn_") for n in names)[:80])
    path = _new_lora_path(host, stem)
    stacked = stacking.merge(stacking.parts_from_files(files, _strengths(strengths, len(files))))
    stacking.write(path, stacked, overwrite=host.overwrite)
    warnings = "".join(f" Warning: {w}." for w in undoing_each_other(stacked.parts(path.name)))
    return (f"Saved {path.name}: {_stack_summary(stacked)}. Use <lora:{stem}:1> in a prompt (refresh the Lora tab); "
            f"Remove takes one concept out again.{warnings}", str(path), None)


@_files_only
def do_remove(host: Host, stack: str, concept: str, name: str = ""):
    """Take one concept's adapter out of a stack in models/Lora. Returns (message, path, None)."""
    stack_file = find_file(stack, host.lora_dir, "stack")
    if stack_file is None:
        raise ValueError("stack: pick a stacked adapter (a file in models/Lora made by Merge)")
    rest = stacking.remove(stacking.load(stack_file), concept, stack_file.name)
    stem = file_stem(name or f"{stack_file.stem}_without_{concept}")
    path = _new_lora_path(host, stem)
    stacking.write(path, rest, overwrite=host.overwrite)
    return (f"Saved {path.name}: {_stack_summary(rest)}. Use <lora:{stem}:1> in a prompt (refresh the Lora tab).",
            str(path), None)


def a1111_training_context(shared, sd_hijack, devices):
    """As A1111's Train tab (modules/textual_inversion/ui.py train_embedding): cross-attention optimizations are
    undone for the run unless Settings > Training "Use cross attention optimizations while training" is on, and
    put back afterwards whatever happens; memory is released at the end."""
    from contextlib import contextmanager

    @contextmanager
    def context():
        keep = bool(getattr(shared.opts, "training_xattention_optimizations", False))
        if not keep:
            sd_hijack.undo_optimizations()
        try:
            yield
        finally:
            if not keep:
                sd_hijack.apply_optimizations()
            devices.torch_gc()
    return context


def a1111_folders() -> tuple[Path, Path]:
    """(models/Lora, embeddings/) of the running A1111, honouring --lora-dir and --embeddings-dir."""
    from modules import paths, shared

    lora_dir = getattr(shared.cmd_opts, "lora_dir", None) or str(Path(paths.models_path) / "Lora")
    embeddings_dir = getattr(shared.cmd_opts, "embeddings_dir", None) or str(Path(paths.data_path) / "embeddings")
    return Path(lora_dir), Path(embeddings_dir)


def a1111_host() -> Host:
    """The Host for the running A1111 (imports modules.* here only)."""
    from modules import call_queue, devices, sd_hijack, shared

    lora_dir, embeddings_dir = a1111_folders()
    opts = shared.opts
    return Host(sd_model=shared.sd_model, lora_dir=lora_dir, embeddings_dir=embeddings_dir,
                state=shared.state, lock=call_queue.queue_lock,
                prepare=a1111_training_context(shared, sd_hijack, devices),
                lowvram=bool(getattr(shared.cmd_opts, "lowvram", False)),
                medvram=bool(getattr(shared.cmd_opts, "medvram", False)),
                autocast=devices.autocast, resolution=int(getattr(opts, "concept_unlearn_resolution", 512)),
                overwrite=bool(getattr(opts, "concept_unlearn_overwrite", False)),
                lr=float(getattr(opts, "concept_unlearn_lr", 0) or 0) or None)
