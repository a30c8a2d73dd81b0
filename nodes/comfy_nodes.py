"""ComfyUI nodes: thin wrappers over the engine. comfy.* is imported only when a node runs."""
from __future__ import annotations

import glob
import re
from pathlib import Path

import torch

from ..unlearn_core import adapter_io, continual, plots, stacking
from ..unlearn_core.config import DEFAULT_PRESERVE, TokenConfig
from ..unlearn_core.erase import erase
from ..unlearn_core.inversion import learn_token
from ..unlearn_core.methods import DEFAULT_METHOD, METHODS as METHOD_TABLE, ROBUST_ROUNDS, method_config
from ..unlearn_core.targets import PRESETS
from ..unlearn_core.tokens import ConceptToken, encode, token_file_stem
from . import host
from .errors import readable_errors
from .host import ErasureAdapter

METHOD_DEFAULT_TARGETS = "method default"  # the targets widget's choice that leaves the method table's own

CATEGORY = "Concept Unlearn"
SUFFIX = "|ConceptUnlearn"
METHODS = tuple(METHOD_TABLE)
NO_FILE = "(connected adapter)"
NO_EARLIER = "none"  # erase_after: no earlier adapter (a plain, not continual, erasure)
PACKAGE = __name__.rsplit(".nodes.", 1)[0]  # under ComfyUI: a name made from the pack folder's path
# The front end gives every seed a "control after generate" widget whose default it picks itself
# ("randomize"); js/concept_unlearn.js sets it to "fixed" on new nodes, so a re-run is served from the cache
# instead of training again.
SEED = ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "control_after_generate": True,
                "tooltip": "Random seed: the same seed and inputs give the same result (set to fixed on new nodes, "
                           "so queueing again reuses the result instead of training again)."})
MODEL_IN = ("MODEL", {"tooltip": "The Stable Diffusion 2.x model (from Load Checkpoint); it is not changed."})
CLIP_IN = ("CLIP", {"tooltip": "The model's CLIP (text encoder); it is not changed."})
VAE_IN = ("VAE", {"tooltip": "The model's VAE, used to encode the example images."})
KIND = (["object", "style"], {"tooltip": "object: a thing, character, person or logo; style: an artist's style or "
                                         "a look (chooses the prompt templates, e.g. 'a painting in the style of')."})
CPU_RESOLUTION, GPU_RESOLUTION = 256, 512


def _resolution():
    """Lighter default on the CPU: a UNet step at 256 px costs about a quarter of one at 512 px."""
    return ("INT", {"default": CPU_RESOLUTION if host.on_cpu() else GPU_RESOLUTION, "min": 0, "max": 1024,
                    "step": 64, "tooltip": "Examples are centre-cropped and resized to this square size (0 keeps "
                    "their size). Smaller is faster (256 is the default on a CPU); SD 2.x was trained at 512/768."})


def _backend(model, clip, vae, resolution):
    from .comfy_backend import ComfyBackend

    return ComfyBackend(model, clip, vae, latent_size=max(8, (resolution or 512) // 8))


def _ui(result_tuple, **ui):
    ui["lines"] = host.display_lines(ui)
    return {"ui": {"concept_unlearn": [ui]}, "result": result_tuple}


class LearnConceptToken:
    """Textual inversion on the loaded model; the token is also saved to models/embeddings."""

    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("CONCEPT_TOKEN", "IMAGE", "STRING")
    RETURN_NAMES = ("token", "loss_curve", "prompt_word")
    DESCRIPTION = "Learn a new token for a concept from a few example images (textual inversion)."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": MODEL_IN, "clip": CLIP_IN, "vae": VAE_IN,
                "images": ("IMAGE", {"tooltip": "4-5 example images of the concept, as one batch (Load Image + "
                                     "Image Batch)."}),
                "token_name": ("STRING", {"default": "my-concept", "tooltip": "The token's name, also its file name "
                                          "in models/embeddings: letters, digits, _ - . (optionally in <>), no spaces. "
                                          "Use it in prompts as embedding:NAME."}),
                "init_word": ("STRING", {"default": "object", "tooltip": "A word close to the concept (e.g. cat, "
                                         "painting): its embedding is where the token starts."}),
                "kind": KIND,
                "vectors": ("INT", {"default": 2, "min": 1, "max": 16, "tooltip": "Embedding vectors the token "
                                    "uses (each takes one of the prompt's 75 token places); 1-4 is usual."}),
                "steps": ("INT", {"default": 100, "min": 1, "max": 10000, "tooltip": "Optimisation steps; each "
                                  "runs the UNet on a batch of 2 images (the node logs the measured cost after "
                                  "step 1)."}),
                "learning_rate": ("FLOAT", {"default": 0.005, "min": 1e-6, "max": 1.0, "step": 0.0001,
                                            "tooltip": "Adam learning rate of the token's vectors (default 0.005)."}),
                "resolution": _resolution(),
                "seed": SEED,
                "save_embedding": ("BOOLEAN", {"default": True, "tooltip": "Save to models/embeddings so "
                                               "embedding:NAME works in any prompt."}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace an embedding of the same name. Off: "
                                          "a name already taken is refused before any training starts."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, token_name=None):  # checked when the prompt is queued, before any node runs
        if token_name is None:  # linked from another node: known only when the node runs
            return True
        try:
            token_file_stem(token_name)
        except ValueError as error:
            return str(error)
        return True

    @readable_errors(PACKAGE)
    def run(self, model, clip, vae, images, token_name, init_word, kind, vectors, steps, learning_rate, resolution,
            seed, save_embedding, overwrite, unique_id=None):
        config = TokenConfig(token=token_name.strip(), n_vectors=vectors, init_word=init_word, kind=kind,
                             steps=steps, lr=learning_rate, seed=seed)
        stem = token_file_stem(config.token)  # ComfyUI names an embedding after its file
        target = None
        if save_embedding:
            target = host.models_folder("embeddings") / f"{stem}.safetensors"
            if target.exists() and not overwrite:
                raise FileExistsError(f"embedding {target.name} already exists: choose another token name or "
                                      "turn on overwrite")
        backend = _backend(model, clip, vae, resolution)
        examples = host.images_to_engine(images, resolution)
        with torch.inference_mode(False), backend.session(examples):
            fingerprint = adapter_io.base_fingerprint(backend)
            result = learn_token(host.Interruptible(backend), examples, config,
                                 host.progress_callback(unique_id, "Learn Concept Token"))
        token = result.token
        saved = ""
        if target is not None:
            adapter_io.write_token(target, token, fingerprint, overwrite=overwrite)
            saved = target.name
        curve = host.pil_to_image(plots.loss_curve(result.history, f"token {token.name}"))
        per_step = result.seconds / max(1, len(result.history))
        return _ui((token, curve, f"embedding:{stem}"), kind="token", token=token.name, vectors=token.n_vectors,
                   steps=len(result.history), seconds_per_step=round(per_step, 3), saved=saved,
                   final_loss=result.history[-1]["loss"] if result.history else None)


class UnlearnConceptLoRA:
    """Train a text-encoder LoRA that erases a concept from the loaded model (the model is not changed)."""

    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("ERASURE_ADAPTER", "IMAGE")
    RETURN_NAMES = ("adapter", "loss_curve")
    DESCRIPTION = "Erase a concept: LoRA on the text encoder only, trained in place on the loaded model."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": MODEL_IN, "clip": CLIP_IN, "vae": VAE_IN,
                "concept": ("STRING", {"default": "a red star", "tooltip": "The concept as people prompt it."}),
                "synonyms": ("STRING", {"default": "", "multiline": False, "tooltip": "Other phrasings of the "
                                        "concept, comma-separated; each is erased too."}),
                "method": (list(METHODS), {"default": DEFAULT_METHOD, "tooltip": " ".join(
                    f"{m.name}: {m.summary}" for m in METHOD_TABLE.values())}),
                "kind": KIND,
                "targets": ([METHOD_DEFAULT_TARGETS, *PRESETS], {"default": METHOD_DEFAULT_TARGETS, "tooltip":
                            "Which text-encoder projections learn: method default (contextual: first, the others: "
                            "fewshot); fewshot = the MLP (fc1, fc2) of every layer + the attention of the last "
                            "layer (the few-shot paper's choice); first = the MLP of the first layer only; final = "
                            "every projection of the last layer only (smallest file, weakest); all = every "
                            "projection of every layer (largest file)."}),
                "steps": ("INT", {"default": METHOD_TABLE[DEFAULT_METHOD].defaults["steps"], "min": 1, "max": 10000,
                                  "tooltip": "Optimisation steps (contextual: 200, a few seconds on a GPU; the "
                                             "UNet-loss methods: 60). The node logs the measured cost after step 1."}),
                "rank": ("INT", {"default": 4, "min": 1, "max": 256, "tooltip": "LoRA rank: capacity of each "
                                 "adapted projection (4 is about 2 MB; the file grows with it). fewshot-paper: the "
                                 "rank its full delta is compressed to."}),
                "learning_rate": ("FLOAT", {"default": 0.001, "min": 1e-7, "max": 1.0, "step": 0.00001,
                                            "tooltip": "Adam learning rate of the LoRA (default 0.001; "
                                                       "fewshot-paper ignores it and uses 1e-5)."}),
                "anchor": ("STRING", {"default": "", "tooltip": "What the concept becomes. Empty: contextual "
                                      "drops the concept's words; anchor/weighted use 'a photo'."}),
                "keep": ("STRING", {"default": "", "multiline": True, "tooltip": "Neighbours that must stay, one "
                                    "per line (e.g. other characters of the same show when erasing one). "
                                    "contextual puts each in the concept's place in every context."}),
                "contexts": ("STRING", {"default": "", "multiline": True, "tooltip": "Prompts with {} where the "
                                        "concept goes, one per line, e.g. 'a {} on a sofa' (the captions of your "
                                        "images are the best contexts). Empty: templates."}),
                "preserve": ("STRING", {"default": "\n".join(p for p in DEFAULT_PRESERVE if p), "multiline": True,
                                        "tooltip": "One prompt per line whose behaviour must not change."}),
                "resolution": _resolution(),
                "seed": SEED,
            },
            "optional": {
                "images": ("IMAGE", {"tooltip": "4-5 example images of the concept (needed by weighted, fewshot "
                                     "and fewshot-paper; contextual and anchor work without)."}),
                "concept_token": ("CONCEPT_TOKEN", {"tooltip": "A token from Learn Concept Token: its prompts are "
                                                   "erased too (useful when words do not name the concept)."}),
                "robust": ("BOOLEAN", {"default": False, "tooltip": f"contextual: {ROBUST_ROUNDS} rounds of a token "
                                       "learned against the adapter from the images, then erased too (resists "
                                       "re-learning better; needs images; slower)."}),
                "gradient_surgery": ("BOOLEAN", {"default": False, "tooltip": "DoCo: drop the part of the erase "
                                                 "gradient that conflicts with keeping the preserve prompts."}),
                "unet_kv_edit": ("BOOLEAN", {"default": True, "tooltip": "contextual (other methods ignore it): also edit what the UNet "
                                 "reads of the text (a closed-form change of its cross-attention key/value "
                                 "projections, seconds; resists re-learned tokens better). The adapter then "
                                 "patches the MODEL too: connect the MODEL to Apply Erasure Adapter (or use the "
                                 "saved file with LoraLoader's strength_model)."}),
                "erase_after": ([NO_EARLIER] + host.file_list("loras"), {"default": NO_EARLIER, "tooltip":
                                "Continual erasure (contextual method): an earlier erasure adapter or stack in "
                                "models/loras, made for this model by this pack. The new concept is erased on the "
                                "model with it applied (its concepts stay erased), and the adapter output is that "
                                "file with the new erasure stacked on: one stack that grows by concept (Remove From "
                                "Erasure Stack takes one out again). The earlier file is not changed: save the "
                                "output with Save Erasure Adapter. none: a plain erasure."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @staticmethod
    def config(concept, synonyms, method, kind, targets, steps, rank, learning_rate, anchor, preserve, seed,
               gradient_surgery=False, keep="", contexts="", robust=False, unet_kv_edit=True):
        return method_config(method, concept, synonyms=host.split_list(synonyms), kind=kind,
                             anchor=anchor.strip() or None, seed=seed, steps=steps, lr=learning_rate,
                             preset=None if targets == METHOD_DEFAULT_TARGETS else targets, rank=rank,
                             preserve=host.split_lines(preserve) + ("",),
                             keep=host.split_lines(keep), contexts=host.split_lines(contexts),
                             gradient_surgery=bool(gradient_surgery) or None,
                             adversarial_rounds=ROBUST_ROUNDS if robust else None,
                             unet_kv_edit=bool(unet_kv_edit))

    @readable_errors(PACKAGE)
    def run(self, model, clip, vae, concept, synonyms, method, kind, targets, steps, rank, learning_rate,
            anchor, keep, contexts, preserve, resolution, seed, images=None, concept_token=None,
            robust=False, gradient_surgery=False, unet_kv_edit=True, erase_after=NO_EARLIER, unique_id=None):
        config = self.config(concept, synonyms, method, kind, targets, steps, rank, learning_rate, anchor,
                             preserve, seed, gradient_surgery, keep, contexts, robust, unet_kv_edit)
        if config.needs_images and images is None:
            raise ValueError(f"method {method!r} needs example images: connect 4-5 images of the concept, or "
                             "use the contextual or anchor method")
        earlier = self.earlier(erase_after, config)  # the file is read and checked before any model loads
        backend = _backend(model, clip, vae, resolution)
        examples = host.images_to_engine(images, resolution) if config.needs_images else None
        with torch.inference_mode(False), backend.session(examples):
            token = None
            if concept_token is not None:
                token = ConceptToken(concept_token.name, concept_token.vectors.detach().clone().float())
            if earlier is not None:  # made for this model (fingerprint, shapes) or refused before training
                continual.check_earlier(earlier, backend)
            fingerprint = adapter_io.base_fingerprint(backend)
            result = erase(host.Interruptible(backend), config, examples, token,
                           host.progress_callback(unique_id, "Unlearn Concept"), earlier=earlier or ())
        if earlier is not None:  # the earlier file with the new part stacked on (saved as it is, like any stack)
            adapter = ErasureAdapter.from_stored(continual.grown(earlier, result, fingerprint,
                                                                 f"(new) {config.concept_label}"))
        else:
            adapter = ErasureAdapter(result.deltas, fingerprint, result.info(), unet=result.unet_deltas)
        curve = host.pil_to_image(plots.loss_curve(result.history, f"erase {config.concept}"))
        per_step = result.seconds / max(1, len(result.history))
        return _ui((adapter, curve), kind="adapter", seconds_per_step=round(per_step, 3), **adapter.summary())

    @staticmethod
    def earlier(erase_after, config):
        """The earlier adapter picked in erase_after (continual.read_earlier), or None for a plain erasure."""
        if not erase_after or erase_after == NO_EARLIER:
            return None
        continual.check_config(config, "erase_after", ": pick contextual, or set erase_after to none")
        return continual.read_earlier(host.full_path("loras", erase_after))


STRENGTH = ("FLOAT", {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.05,
                      "tooltip": "Erasure strength: 1 as trained, 0 no effect, between them partly erased; above 1 "
                                 "pushes further (and changes other prompts more). Same as strength_clip of Load LoRA."})


class ApplyErasureAdapter:
    """Patch the CLIP (and the MODEL, for an adapter with the UNet key/value edit) through ComfyUI's own LoRA
    loading (same as LoraLoader). Workflows saved before the MODEL input/output existed load unchanged: the MODEL
    is an optional link (no widget moves) and the CLIP stays output 0."""

    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("CLIP", "MODEL")
    RETURN_NAMES = ("CLIP", "MODEL")  # the names the outputs had before (the type names)
    DESCRIPTION = ("Apply an erasure adapter (connected, or a file from models/loras) to the CLIP, and to the MODEL "
                   "when the adapter also edits the UNet (unet_kv_edit): connect the MODEL then.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "The CLIP to patch (a patched copy comes out; this one is not changed)."}),
                "strength": STRENGTH,
                "lora_name": ([NO_FILE] + host.file_list("loras"), {"tooltip": "An adapter file in models/loras, "
                              "used when no adapter is connected."}),
            },
            "optional": {"adapter": ("ERASURE_ADAPTER", {"tooltip": "An adapter from Unlearn Concept LoRA or Load "
                                                        "Erasure Adapter (wins over lora_name)."}),
                         "model": ("MODEL", {"tooltip": "The MODEL, needed when the adapter also edits the UNet "
                                             "(unet_kv_edit); a patched copy comes out of the model output (this one "
                                             "is not changed). Not connected: the model output is empty."})},
        }

    @readable_errors(PACKAGE)
    def run(self, clip, strength, lora_name, adapter=None, model=None):
        if adapter is None:
            if lora_name == NO_FILE:
                raise ValueError("no adapter: connect an ERASURE_ADAPTER or pick a file in lora_name")
            adapter = load_adapter_file(clip, lora_name, allow_other_base=False, model=model)
        patched_model, patched = host.apply_to_models(model, clip, adapter, strength)
        return _ui((patched, patched_model), kind="adapter", strength=strength, **adapter.summary())


def load_adapter_file(clip, lora_name: str, allow_other_base: bool, model=None) -> ErasureAdapter:
    from .comfy_backend import TextEncoderView

    clip.load_model()  # the weights the conditioning will use (with any patches already on this CLIP)
    view = TextEncoderView(clip)
    if model is not None:  # the file's UNet keys are checked against this UNet's projections (names, shapes)
        from .comfy_backend import unet_kv_modules

        view.cross_attention_kv = lambda: unet_kv_modules(model.model)
    path = host.full_path("loras", lora_name)
    file = adapter_io.read_adapter(path, view, allow_other_base=allow_other_base)
    if stacking.STACK_KEY in file.metadata:  # kept as stored, so that parts can be removed from it
        return ErasureAdapter.from_stored(stacking.load(path), source=lora_name)
    info = {k[len(adapter_io.NAMESPACE) + 1:]: _decode(v) for k, v in file.metadata.items()
            if k.startswith(adapter_io.NAMESPACE + ".") and k not in (f"{adapter_io.NAMESPACE}.base_fingerprint",)}
    return ErasureAdapter(file.deltas, file.fingerprint, info, source=lora_name, unet=file.unet)


def _decode(value: str):
    import json

    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


class LoadErasureAdapter:
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("ERASURE_ADAPTER",)
    RETURN_NAMES = ("adapter",)
    DESCRIPTION = "Load an erasure adapter from models/loras, checked against the connected CLIP's base model."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP", {"tooltip": "The CLIP the adapter will be applied to: the file is checked against its "
                              "base model."}),
            "lora_name": (host.file_list("loras"), {"tooltip": "An erasure adapter file in models/loras."}),
            "allow_other_base": ("BOOLEAN", {"default": False, "tooltip": "Load an adapter made for another base "
                                             "model anyway (its effect on this one is unknown)."})}}

    @readable_errors(PACKAGE)
    def run(self, clip, lora_name, allow_other_base):
        adapter = load_adapter_file(clip, lora_name, allow_other_base)
        return _ui((adapter,), kind="adapter", **adapter.summary())


class SaveErasureAdapter:
    """Save to models/loras like ComfyUI's own savers: a name already taken gets a counter suffix, so a run that
    trained for minutes never ends in an error here (overwrite replaces the file instead)."""

    CATEGORY = CATEGORY
    FUNCTION = "run"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("lora_name",)
    DESCRIPTION = ("Save to models/loras as a kohya LoRA of the text encoder (and of the UNet's cross-attention "
                   "keys/values with unet_kv_edit; loads with the stock LoraLoader). A name already taken gets a "
                   "counter: no-cat_00001_.safetensors.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "adapter": ("ERASURE_ADAPTER", {"tooltip": "The adapter to save (from Unlearn Concept LoRA or Erasure "
                                           "Audit, which adds the audit to its metadata)."}),
            "name": ("STRING", {"default": "erasure/no-concept", "tooltip": "File name inside models/loras, "
                                "sub-folders allowed; .safetensors is added. Taken: a counter is appended, as "
                                "Save Image does."}),
            "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace a file of the same name instead of "
                                      "adding a counter."})}}

    @classmethod
    def VALIDATE_INPUTS(cls, name=None):  # checked when the prompt is queued, before any training starts
        if name is None:  # linked from another node: known only when the node runs
            return True
        try:
            _lora_path(name)
        except ValueError as error:
            return str(error)
        return True

    @readable_errors(PACKAGE)
    def run(self, adapter, name, overwrite):
        folder, path = _lora_path(name)
        path = _save_adapter(path, adapter, overwrite)
        lora_name = path.relative_to(folder).as_posix()
        return _ui((lora_name,), kind="adapter", saved=lora_name, **adapter.summary())


def _lora_path(name: str):
    """(models/loras, the file) for a relative name, or ValueError when the name leaves models/loras."""
    relative = (name or "").strip().removesuffix(".safetensors")
    if not relative or "\\" in relative or relative.startswith("/"):
        raise ValueError(f"name {name!r} must be a relative file name inside models/loras, e.g. erasure/no-cat")
    try:
        folder = host.models_folder("loras").resolve()
    except ImportError:  # validating outside ComfyUI (tests): only the name's form can be checked
        folder = Path("/loras")
    path = (folder / f"{relative}.safetensors").resolve()
    if folder not in path.parents:
        raise ValueError(f"name {name!r} must be a relative file name inside models/loras, e.g. erasure/no-cat")
    return folder, path


COUNTER = re.compile(r"_(\d{5,})_$")


def numbered(path: Path) -> Path:
    """The next free ``stem_NNNNN_.safetensors`` beside ``path`` (counting on from the highest, as ComfyUI's
    folder_paths.get_save_image_path does for Save Image)."""
    taken = [int(m.group(1)) for p in path.parent.glob(f"{glob.escape(path.stem)}_*_.safetensors")
             if (m := COUNTER.search(p.stem)) and p.stem[:m.start()] == path.stem]
    return path.with_name(f"{path.stem}_{max(taken, default=0) + 1:05d}_.safetensors")


def _save_adapter(path: Path, adapter: ErasureAdapter, overwrite: bool) -> Path:
    """Write without replacing anything (unless ``overwrite``): the name, else the next counter; a file that
    appears meanwhile (another queue, another user) moves on to the next counter."""
    if overwrite:
        return _write(path, adapter, overwrite=True)
    candidate = path
    for _ in range(1000):
        if not candidate.exists():
            try:
                return _write(candidate, adapter, overwrite=False)
            except FileExistsError:
                pass  # taken between the check and the write: the no-replace publish refused it
        candidate = numbered(path)
    raise FileExistsError(f"could not find a free name for {path.name} in {path.parent}")


STACK_INPUTS = 4  # adapter inputs of one Stack node (chain Stack nodes for more)


class StackErasureAdapters:
    """Merge erasure adapters into one whose effect is the exact sum of theirs (stacks, see unlearn_core.stacking)."""

    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("ERASURE_ADAPTER",)
    RETURN_NAMES = ("stack",)
    DESCRIPTION = ("Stack erasure adapters into one (its effect is the sum of theirs; every host loads it like any "
                   "LoRA). Remove From Erasure Stack takes one out again exactly. Connect a stack to stack more.")

    @classmethod
    def INPUT_TYPES(cls):
        optional = {}
        for i in range(1, STACK_INPUTS + 1):
            optional[f"adapter_{i}"] = ("ERASURE_ADAPTER", {"tooltip": "An adapter or a stack (its parts join)."})
            optional[f"strength_{i}"] = ("FLOAT", {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.05,
                                                   "tooltip": f"Strength of adapter_{i} in the stack (not 0)."})
        return {
            "required": {
                "lora_names": ("STRING", {"default": "", "multiline": True, "tooltip": "Files in models/loras to "
                               "stack too, one per line; 'name.safetensors:0.5' gives one a strength."}),
                "allow_other_base": ("BOOLEAN", {"default": False, "tooltip": "Stack adapters whose base-model "
                                     "fingerprints differ or are missing."}),
            },
            "optional": optional,
        }

    @readable_errors(PACKAGE)
    def run(self, lora_names, allow_other_base, adapter_1=None, strength_1=1.0, adapter_2=None, strength_2=1.0,
            adapter_3=None, strength_3=1.0, adapter_4=None, strength_4=1.0):
        parts = []
        connected = ((adapter_1, strength_1), (adapter_2, strength_2), (adapter_3, strength_3), (adapter_4, strength_4))
        for i, (adapter, strength) in enumerate(connected, 1):
            if adapter is not None:
                label = adapter.source or f"(connected) {adapter.info.get('concept', f'adapter_{i}')}"
                parts.append(stacking.Part(adapter.as_stored(), label, float(strength)))
        for line in host.split_lines(lora_names):
            name, strength = _name_and_strength(line)
            parts.append(stacking.Part(stacking.load(host.full_path("loras", name)), name, strength))
        if not parts:
            raise ValueError("nothing to stack: connect erasure adapters or list files of models/loras")
        stored = stacking.merge(parts, allow_other_base)
        stack = ErasureAdapter.from_stored(stored)
        warnings = continual.undoing_each_other(stored.parts())
        return _ui((stack,), kind="adapter", **stack.summary(), warnings=warnings)


def _name_and_strength(line: str) -> tuple[str, float]:
    """'name.safetensors:0.5' -> (name.safetensors, 0.5); a line without a number after ':' is all name."""
    name, _, tail = line.rpartition(":")
    try:
        return (name.strip(), float(tail)) if name.strip() else (line, 1.0)
    except ValueError:
        return line, 1.0


class RemoveFromErasureStack:
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("ERASURE_ADAPTER",)
    RETURN_NAMES = ("adapter",)
    DESCRIPTION = ("Take one concept's adapter out of a stack: the other parts come back exactly as stacking them "
                   "alone gives (the original adapter when one remains).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"stack": ("ERASURE_ADAPTER", {"tooltip": "A stack from Stack Erasure Adapters or a "
                                                          "stacked file from Load Erasure Adapter."}),
                             "concept": ("STRING", {"default": "", "tooltip": "The concept to remove (as the stack "
                                                    "lists it) or its part's file name."})}}

    @readable_errors(PACKAGE)
    def run(self, stack, concept):
        if stack.stored is None or not stack.stored.is_stack:
            raise ValueError("the adapter is not a stack: connect Stack Erasure Adapters, or Load Erasure Adapter "
                             "with a stacked file")
        rest = ErasureAdapter.from_stored(stacking.remove(stack.stored, concept, stack.source or "the stack"))
        return _ui((rest,), kind="adapter", removed=concept.strip(), **rest.summary())


def _write(path: Path, adapter: ErasureAdapter, overwrite: bool) -> Path:
    if adapter.stored is not None:  # a stack: its exact tensors and parts record (plus an audit of it)
        audit = {"audit": adapter.info["audit"]} if "audit" in adapter.info else {}
        stacking.write(path, adapter.stored.with_info(**audit), overwrite=overwrite)
    else:
        adapter_io.write_adapter(path, adapter.deltas, adapter.fingerprint, adapter.info, overwrite=overwrite,
                                 unet=adapter.unet)
    return path


class ErasureAudit:
    """Before/after images for a list of prompts; optionally the re-learned-token attack."""

    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE", "ERASURE_ADAPTER")
    RETURN_NAMES = ("grid", "adapter")
    DESCRIPTION = ("Generate each prompt without and with the adapter. With attack_steps > 0 a token is re-learned "
                   "on the erased model from the images: if it brings the concept back, the erasure is shallow.")

    @classmethod
    def INPUT_TYPES(cls):
        samplers, schedulers = _sampler_names()
        size = 256 if host.on_cpu() else 512  # lighter default on a CPU
        return {
            "required": {
                "model": MODEL_IN, "clip": CLIP_IN,
                "vae": ("VAE", {"tooltip": "The model's VAE, to decode the generated images."}),
                "adapter": ("ERASURE_ADAPTER", {"tooltip": "The adapter to audit."}),
                "prompts": ("STRING", {"default": "a photo of a red star\na photo of a blue circle", "multiline": True,
                                       "tooltip": "One prompt per line, each generated without and with the "
                                                  "adapter: the concept's prompts (should change) and others "
                                                  "(should not)."}),
                "negative": ("STRING", {"default": "", "tooltip": "Negative prompt for every image."}),
                "strength": STRENGTH,
                "seed": SEED,
                "steps": ("INT", {"default": 20, "min": 1, "max": 200, "tooltip": "Sampling steps per image "
                                  "(as KSampler's steps); the node's progress bar counts every image's steps."}),
                "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 30.0, "step": 0.1,
                                  "tooltip": "Classifier-free guidance scale (as KSampler's cfg)."}),
                "sampler_name": (samplers, {"tooltip": "Sampler (as KSampler's sampler_name)."}),
                "scheduler": (schedulers, {"tooltip": "Noise schedule (as KSampler's scheduler)."}),
                "width": ("INT", {"default": size, "min": 64, "max": 2048, "step": 64,
                                  "tooltip": "Image width in pixels (256 is the default on a CPU)."}),
                "height": ("INT", {"default": size, "min": 64, "max": 2048, "step": 64,
                                   "tooltip": "Image height in pixels (256 is the default on a CPU)."}),
                "attack_steps": ("INT", {"default": 0, "min": 0, "max": 5000,
                                         "tooltip": "0: no attack. Otherwise textual-inversion steps on the erased "
                                                    "model (needs images): if the re-learned token draws the "
                                                    "concept again, the erasure is shallow."}),
            },
            "optional": {"images": ("IMAGE", {"tooltip": "The concept's example images, for the attack."})},
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @readable_errors(PACKAGE)
    def run(self, model, clip, vae, adapter, prompts, negative, strength, seed, steps, cfg, sampler_name, scheduler,
            width, height, attack_steps, images=None, unique_id=None):
        prompt_list = list(host.split_lines(prompts))
        if not prompt_list:
            raise ValueError("no prompts: write one prompt per line")
        if attack_steps > 0 and images is None:
            raise ValueError("the attack needs the concept's example images: connect images or set attack_steps to 0")
        # one bar over every sampling step (2 per prompt, +1 image and the token steps for the attack); each update
        # checks ComfyUI's interrupt, so Cancel stops the audit within one sampling step
        progress = host.Progress(2 * len(prompt_list) * steps + (attack_steps + steps if attack_steps > 0 else 0),
                                 unique_id)
        erased_model, erased = host.apply_to_models(model, clip, adapter, strength)
        rows, shifts = [], {}
        sampling = (seed, steps, cfg, sampler_name, scheduler, width, height, progress)
        for prompt in prompt_list:
            before, cond_before = _generate(model, clip, vae, prompt, negative, *sampling)
            after, cond_after = _generate(erased_model, erased, vae, prompt, negative, *sampling)
            shifts[prompt] = round(float((cond_after - cond_before).norm() / cond_before.norm().clamp_min(1e-8)), 4)
            rows.append([host.image_to_pil(before[0]), host.image_to_pil(after[0])])
        labels = list(prompt_list)
        audit = {"strength": strength, "conditioning_shift": shifts}
        if attack_steps > 0:
            attack_image, attack_loss = _attack(erased_model, erased, vae, images, attack_steps, negative, *sampling)
            example = host.images_to_engine(images[:1], 0)[0].permute(1, 2, 0)
            rows.append([host.image_to_pil(example), host.image_to_pil(attack_image[0])])
            labels.append("re-learned token (example | erased)")
            audit["attack"] = {"steps": attack_steps, "final_loss": round(attack_loss, 5)}
        grid = plots.grid(rows, labels, ["before", f"after x{strength:g}"], cell=min(256, max(width, height)))
        audited = adapter.with_info(audit=audit)
        return _ui((host.pil_to_image(grid), audited), kind="audit", **audited.summary())


def _sampler_names():
    try:
        import comfy.samplers

        return comfy.samplers.KSampler.SAMPLERS, comfy.samplers.KSampler.SCHEDULERS
    except ImportError:
        return ["euler"], ["normal"]


def _conditioning(clip, text):
    cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return [[cond, {"pooled_output": pooled}]], cond


def _sample(model, vae, positive, negative, seed, steps, cfg, sampler_name, scheduler, width, height, progress):
    import comfy.sample

    latent = torch.zeros([1, 4, height // 8, width // 8])
    noise = comfy.sample.prepare_noise(latent, seed)
    samples = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                                  seed=seed, disable_pbar=True, callback=progress.sampler_callback())
    return vae.decode(samples)


def _generate(model, clip, vae, prompt, negative, seed, steps, cfg, sampler_name, scheduler, width, height, progress):
    positive, cond = _conditioning(clip, prompt)
    negative_cond, _ = _conditioning(clip, negative)
    image = _sample(model, vae, positive, negative_cond, seed, steps, cfg, sampler_name, scheduler, width, height,
                    progress)
    return image, cond


def _attack(model, erased_clip, vae, images, attack_steps, negative, seed, steps, cfg, sampler_name, scheduler,
            width, height, progress):
    """Re-learn a token on the erased model (the benchmark's attack) and generate with it."""
    backend = _backend(model, erased_clip, vae, width)
    examples = host.images_to_engine(images, min(width, height) // 64 * 64)
    config = TokenConfig(token="<attack>", n_vectors=2, steps=attack_steps, seed=seed)
    with torch.inference_mode(False), backend.session(examples):
        result = learn_token(host.Interruptible(backend, progress.check), examples, config, progress.engine_callback())
        with torch.no_grad():
            cond = encode(backend, [f"a photo of {config.token}"], result.token).detach().cpu()
    negative_cond, _ = _conditioning(erased_clip, negative)
    image = _sample(model, vae, [[cond, {"pooled_output": None}]], negative_cond, seed, steps, cfg, sampler_name,
                    scheduler, width, height, progress)
    return image, result.history[-1]["loss"]


NODES = {
    "LearnConceptToken": ("Learn Concept Token", LearnConceptToken),
    "UnlearnConceptLoRA": ("Unlearn Concept LoRA", UnlearnConceptLoRA),
    "ApplyErasureAdapter": ("Apply Erasure Adapter", ApplyErasureAdapter),
    "SaveErasureAdapter": ("Save Erasure Adapter", SaveErasureAdapter),
    "LoadErasureAdapter": ("Load Erasure Adapter", LoadErasureAdapter),
    "ErasureAudit": ("Erasure Audit", ErasureAudit),
    "StackErasureAdapters": ("Stack Erasure Adapters", StackErasureAdapters),
    "RemoveFromErasureStack": ("Remove From Erasure Stack", RemoveFromErasureStack),
}
NODE_CLASS_MAPPINGS = {name + SUFFIX: cls for name, (_, cls) in NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {name + SUFFIX: title for name, (title, _) in NODES.items()}
