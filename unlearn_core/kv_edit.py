"""Closed-form edit of the UNet's cross-attention key/value projections (UCE-style), exported as an exact LoRA.

Every cross-attention layer of the UNet reads the text conditioning only through two linear maps, ``to_k`` and
``to_v`` (weights W [out, d], d = the text encoder's width). Editing them changes what the UNet *reads* of any
conditioning, including the conditioning of a token learned later by an attacker, which a text-encoder-only
erasure cannot control.

The edit (vectors are columns; C [d, n_c] concept vectors, A [d, n_c] their targets, K [d, n_k] preserved):

    W' = argmin_W'  1/n_c sum_i ||W' c_i - W a_i||^2  +  lam/n_k sum_j ||W' k_j - W k_j||^2
                    +  lam_e/n_e sum_j ||W' e_j - W e_j||^2  +  mu s ||W' - W||_F^2

with s = trace(C C^T)/(n_c d) (the concept vectors' mean square per dimension: mu is unit-free). Setting the
gradient to zero:  W' M = W A C^T/n_c + lam W K K^T/n_k + lam_e W E E^T/n_e + mu s W  with
M = C C^T/n_c + lam K K^T/n_k + lam_e E E^T/n_e + mu s I, and adding/subtracting W C C^T/n_c on the right:

    W' = W + W (A - C) C^T M^-1 / n_c,   i.e.  dW = W G  with  G = (A - C) C^T M^-1 / n_c   [d, d].

G is the same for every layer, so all layers are edited "in the same directions". rank dW <= min(n_c, d): when
n_c <= the rank cap, dW = (W (A - C)) (C^T M^-1 / n_c) is an exact LoRA (up [out, n_c], down [n_c, d]); otherwise
it is compressed per layer by truncated SVD (``torch.svd_lowrank``) and the relative Frobenius error is recorded.
With lam > 0 and mu -> 0, preserved directions independent of the concept's are kept exactly (dW k = 0).

Which vectors (``vectors_after_erasure``, used by ``erase`` when ``EraseConfig.unet_kv_edit`` is on):
- C: the conditioning of every erase prompt (the concept's phrasings, synonyms, tokens in every context) at the
  concept's token position and every position after it (the causal text encoder lets the concept reach those;
  padding included, the UNet attends to all 77), both as the erased model outputs it (what the UNet sees with the
  adapter) and as the clean model does (what an attack tries to bring back). The concept's first position is the
  first one where the prompt's frozen conditioning differs from its target (earlier positions cannot see it).
- A: at the same positions, the frozen conditioning the contextual method maps the prompt to (the same prompt with
  the anchor, or the neighbours' mean), *without* its negative guidance: mapping c onto a point that already
  exists (the neighbours' mean, which is preserved) makes W' singular along the concept's own direction, so no
  conditioning - a learned token's included - can bring that direction back; a pushed-away target would only
  relabel the direction (W' invertible), which a re-learned token undoes.
- K: every position of the keep prompts (the contexts with each neighbour, the preserve prompts), as the erased
  model outputs them.
- E: every position of the empty prompt, which classifier-free guidance reads for every image: its own weight
  lam_e = ``empty_weight`` (the text-encoder term's, default 10), so its 77 vectors are not lost among the keep
  set's thousands (with them in K, the edit moved the empty prompt's keys/values by 3-6 %).
Defaults: lam = ``kv_preserve_weight`` = 1 (mean error over the keep set weighs as much as over the concept's),
mu = ``kv_ridge`` = 1e-3 (the edit stays small in directions neither set covers), rank cap ``kv_rank`` = 16.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .lora import kohya_lora_tensors

# canonical names: the diffusers module paths of SD2's cross-attention key/value projections
_N = r"(?:0|[1-9][0-9]*)"
_BLOCK = rf"(?:down_blocks\.{_N}\.attentions\.{_N}|mid_block\.attentions\.{_N}|up_blocks\.{_N}\.attentions\.{_N})"
_NAME_RE = re.compile(rf"^{_BLOCK}\.transformer_blocks\.{_N}\.attn2\.to_(k|v)\Z")
_U = _BLOCK.replace(r"\.", "_")
_KOHYA_RE = re.compile(rf"^lora_unet_{_U}_transformer_blocks_{_N}_attn2_to_(k|v)\Z")
KOHYA_PREFIX = "lora_unet_"


class UnsupportedOption(ValueError):
    """An option the host the engine runs in cannot provide yet."""


def is_kv_name(name: str) -> bool:
    return bool(_NAME_RE.match(name))


def kohya_name(name: str) -> str:
    """``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k`` -> ``lora_unet_down_blocks_0_..._attn2_to_k``
    (kohya's SD1/SD2 UNet naming: the diffusers path with '_'; diffusers, ComfyUI and A1111 map it back)."""
    if not is_kv_name(name):
        raise ValueError(f"{name!r} is not a cross-attention key/value projection of the UNet")
    return KOHYA_PREFIX + name.replace(".", "_")


def name_from_kohya(key: str) -> str:
    """The canonical name of a kohya ``lora_unet_*attn2_to_k/to_v`` module key."""
    if not _KOHYA_RE.match(key):
        raise ValueError(f"{key!r} is not a UNet cross-attention key/value LoRA key "
                         "(lora_unet_<block>_transformer_blocks_N_attn2_to_k / to_v)")
    name = key[len(KOHYA_PREFIX):]
    for part in ("down_blocks", "mid_block", "up_blocks", "transformer_blocks", "to_k", "to_v"):
        name = name.replace(part, part.replace("_", "\0"))
    return name.replace("_", ".").replace("\0", "_")


def kv_modules(backend) -> dict[str, nn.Module]:
    """The backend's cross-attention to_k/to_v linears by canonical name; a clear error where the host has none."""
    provider = getattr(backend, "cross_attention_kv", None)
    if provider is None:
        raise UnsupportedOption(f"unet_kv_edit: the UNet key/value edit is not available in this host yet "
                                f"({type(backend).__name__}); it runs with the diffusers backend (command line, "
                                "Python). Turn the option off to erase with the text encoder alone")
    modules = provider()
    if not modules:
        raise UnsupportedOption("unet_kv_edit: this UNet has no cross-attention key/value projections")
    return modules


# LDM (CompVis / Stability openaimodel UNetModel, as ComfyUI and A1111 hold SD2) names of the same projections
_LDM_RE = re.compile(rf"^(?:(input_blocks|output_blocks)\.({_N})|(middle_block))\.1\.(transformer_blocks\.{_N}\.attn2\.to_[kv])\Z")


def name_from_ldm(ldm_name: str, res_blocks: int = 2) -> str | None:
    """The canonical (diffusers) name of an LDM UNet's cross-attention key/value projection, or None when
    ``ldm_name`` is not one. ``res_blocks``: res blocks per level (SD2: 2; down level b holds input blocks
    1 + b*(res_blocks+1) + j, j < res_blocks, its downsampler the last slot; up level b holds output blocks
    b*(res_blocks+1) + j, j <= res_blocks). The inverse of what diffusers' single-file loader, ComfyUI's
    ``comfy.utils.unet_to_diffusers`` and A1111's ``convert_diffusers_name_to_compvis`` (for 2) map."""
    match = _LDM_RE.match(ldm_name)
    if not match:
        return None
    kind, index, middle, rest = match.groups()
    if middle:
        return f"mid_block.attentions.0.{rest}"
    level, slot = divmod(int(index) - (1 if kind == "input_blocks" else 0), res_blocks + 1)
    if kind == "input_blocks":
        if int(index) < 1 or slot >= res_blocks:  # input block 0 is conv_in, slot res_blocks the downsampler
            return None
        return f"down_blocks.{level}.attentions.{slot}.{rest}"
    return f"up_blocks.{level}.attentions.{slot}.{rest}"


def ldm_name(name: str, res_blocks: int = 2) -> str:
    """The LDM path of a canonical name (the inverse of ``name_from_ldm``)."""
    if not is_kv_name(name):
        raise ValueError(f"{name!r} is not a cross-attention key/value projection of the UNet")
    parts = name.split(".")
    rest = ".".join(parts[4:] if parts[0] != "mid_block" else parts[3:])
    if parts[0] == "mid_block":
        return f"middle_block.1.{rest}"
    level, slot = int(parts[1]), int(parts[3])
    if parts[0] == "down_blocks":
        return f"input_blocks.{1 + level * (res_blocks + 1) + slot}.1.{rest}"
    return f"output_blocks.{level * (res_blocks + 1) + slot}.1.{rest}"


def ldm_kv_modules(unet: nn.Module, res_blocks: int) -> dict[str, nn.Module]:
    """An LDM UNet's cross-attention to_k/to_v linears by canonical name (``unet``: the ``diffusion_model``)."""
    out = {}
    for path, module in unet.named_modules():
        name = name_from_ldm(path, res_blocks)
        if name is not None and isinstance(module, nn.Linear):
            out[name] = module
    return out


# ---------------------------------------------------------------------------- the closed form (pure)

class Statistics:
    """Sufficient statistics of the least-squares problem, accumulated in float64 from row-vector chunks [n, d]."""

    def __init__(self, width: int):
        self.width = width
        self.cc = torch.zeros(width, width, dtype=torch.float64)  # sum c c^T
        self.dc = torch.zeros(width, width, dtype=torch.float64)  # sum (a - c) c^T
        self.kk = torch.zeros(width, width, dtype=torch.float64)  # sum k k^T
        self.ee = torch.zeros(width, width, dtype=torch.float64)  # sum e e^T, the empty prompt's vectors
        self.n_concept = 0
        self.n_keep = 0
        self.n_empty = 0

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        # float64 on the CPU: rounding noise in these sums is amplified by up to 1/ridge in directions that
        # neither set covers; on an accelerator float32 (its float64 is slow), fine for ridges >= 1e-4
        x = x.reshape(-1, self.width)
        return x.double() if x.device.type == "cpu" else x.float()

    def add_concept(self, concept: torch.Tensor, target: torch.Tensor) -> None:
        c, a = self._rows(concept), self._rows(target)
        self.cc += (c.t() @ c).double().cpu()
        self.dc += ((a - c).t() @ c).double().cpu()
        self.n_concept += c.shape[0]

    def add_keep(self, keep: torch.Tensor) -> None:
        k = self._rows(keep)
        self.kk += (k.t() @ k).double().cpu()
        self.n_keep += k.shape[0]

    def add_empty(self, empty: torch.Tensor) -> None:
        e = self._rows(empty)
        self.ee += (e.t() @ e).double().cpu()
        self.n_empty += e.shape[0]

    def operator(self, preserve_weight: float, ridge: float, empty_weight: float = 0.0) -> torch.Tensor:
        """G [d, d] (float64) with dW = W G for every edited W."""
        if self.n_concept == 0:
            return torch.zeros(self.width, self.width, dtype=torch.float64)
        cc = self.cc / self.n_concept
        scale = float(torch.trace(cc)) / self.width
        m = cc + ridge * max(scale, 1e-30) * torch.eye(self.width, dtype=torch.float64)
        if self.n_keep and preserve_weight:
            m = m + preserve_weight * self.kk / self.n_keep
        if self.n_empty and empty_weight:
            m = m + empty_weight * self.ee / self.n_empty
        # G = D M^-1 with M symmetric: G^T = M^-1 D^T
        return torch.linalg.solve(m, (self.dc / self.n_concept).t()).t()


def closed_form_delta(weight: torch.Tensor, concept: torch.Tensor, target: torch.Tensor, keep: torch.Tensor | None,
                      preserve_weight: float = 1.0, ridge: float = 1e-3) -> torch.Tensor:
    """dW [out, d] (float64) for W [out, d], concept and target vectors [n_c, d], preserved vectors [n_k, d]."""
    stats = Statistics(weight.shape[1])
    stats.add_concept(concept, target)
    if keep is not None and len(keep):
        stats.add_keep(keep)
    return weight.double().cpu() @ stats.operator(preserve_weight, ridge)


def low_rank(delta: torch.Tensor, rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(up [out, r], down [r, d], relative Frobenius error) with up @ down ~ delta, r <= rank.

    Exact (to float64 rounding) when rank(delta) <= rank. The singular values are split evenly between the two
    factors, which keeps both in float16's range."""
    delta = delta.double()
    r = max(1, min(rank, *delta.shape))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        q = min(r + 10, *delta.shape)
        u, s, v = torch.svd_lowrank(delta, q=q, niter=6)
    u, s, v = u[:, :r], s[:r], v[:, :r]
    root = s.sqrt()
    up, down = u * root, (v * root).t()
    scale = float(torch.linalg.matrix_norm(delta))
    error = float(torch.linalg.matrix_norm(delta - up @ down)) / scale if scale > 0 else 0.0
    return up, down, error


# ---------------------------------------------------------------------------- deltas on the UNet

class KVDeltas(nn.Module):
    """Fixed low-rank deltas on the UNet's cross-attention to_k/to_v, added through forward hooks
    (``y += up @ down @ x``); the hooked modules and their weights are never replaced or written."""

    def __init__(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], errors: dict[str, float] | None = None):
        super().__init__()
        if not factors:
            raise ValueError("no cross-attention projections to edit")
        self.names = sorted(factors)
        for name in self.names:
            if not is_kv_name(name):
                raise ValueError(f"{name!r} is not a cross-attention key/value projection of the UNet")
        self.up = nn.ParameterDict({_key(n): nn.Parameter(factors[n][0].float().clone(), requires_grad=False)
                                    for n in self.names})
        self.down = nn.ParameterDict({_key(n): nn.Parameter(factors[n][1].float().clone(), requires_grad=False)
                                      for n in self.names})
        self.errors = dict(errors or {})
        self.notes: list[str] = []

    @property
    def rank(self) -> int:
        return max(self.down[_key(n)].shape[0] for n in self.names)

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return {n: (self.up[_key(n)].shape[0], self.down[_key(n)].shape[1]) for n in self.names}

    def delta_weight(self, name: str) -> torch.Tensor:
        return self.up[_key(name)] @ self.down[_key(name)]

    @contextmanager
    def inject(self, modules: dict[str, nn.Module]) -> Iterator["KVDeltas"]:
        """Hook ``modules[name]`` (e.g. ``kv_modules(backend)``) for the block; hooks removed on exit."""
        missing = [n for n in self.names if n not in modules]
        if missing:
            raise ValueError(f"this UNet has no cross-attention projection {missing[0]}")
        handles = []
        try:
            for name in self.names:
                handles.append(modules[name].register_forward_hook(self._hook(name)))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, name: str):
        up, down = self.up[_key(name)], self.down[_key(name)]

        def hook(_module, inputs, output):
            x = inputs[0].to(torch.float32)
            return output + ((x @ down.to(x.device).t()) @ up.to(x.device).t()).to(output.dtype)
        return hook

    def to_kohya(self, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        tensors = {}
        for name in self.names:
            down, up = self.down[_key(name)], self.up[_key(name)]
            # alpha = rank: scale 1 (the scale is folded into up)
            tensors |= kohya_lora_tensors(kohya_name(name), down, up, down.shape[0], dtype)
        return tensors

    @classmethod
    def from_kohya(cls, tensors: dict[str, torch.Tensor]) -> "KVDeltas":
        """From validated file tensors (``lora_unet_*`` keys only); alpha / rank is folded into ``up``."""
        factors = {}
        for key in tensors:
            base, _, suffix = key.partition(".")
            if suffix != "lora_down.weight":
                continue
            down, up = tensors[key].float(), tensors[f"{base}.lora_up.weight"].float()
            alpha = float(tensors[f"{base}.alpha"]) if f"{base}.alpha" in tensors else float(down.shape[0])
            factors[name_from_kohya(base)] = (up * (alpha / down.shape[0]), down)
        return cls(factors)


def _key(name: str) -> str:
    return name.replace(".", "_")


@contextmanager
def applied(unet_deltas: KVDeltas | None, backend) -> Iterator[None]:
    """``unet_deltas`` hooked on the backend's UNet for the block (nothing when None)."""
    if unet_deltas is None:
        yield
        return
    with unet_deltas.inject(kv_modules(backend)):
        yield


def edit(modules: dict[str, nn.Module], stats: Statistics, preserve_weight: float, ridge: float, rank: int,
         seed: int = 0, empty_weight: float = 0.0, earlier: tuple[KVDeltas, ...] = ()) -> KVDeltas:
    """The closed-form edit of every module in ``modules`` (name -> linear with weight [out, d]) as KVDeltas.

    ``earlier``: edits already applied to these modules (continual erasure); the new edit is computed on the
    effective weights W + their deltas, so the model with all of them holds (W + earlier) (I + G)."""
    operator = stats.operator(preserve_weight, ridge, empty_weight)
    factors, errors = {}, {}
    for name, module in sorted(modules.items()):
        weight = module.weight.detach().double().cpu()
        for previous in earlier:
            if name in previous.names:
                weight = weight + previous.delta_weight(name).detach().double().cpu()
        delta = weight @ operator
        up, down, errors[name] = low_rank(delta, rank, seed)
        factors[name] = (up, down)
    deltas = KVDeltas(factors, errors)
    worst = max(errors.values())
    deltas.notes.append(f"UNet cross-attention key/value edit on {len(factors)} projections, rank {deltas.rank}, "
                        f"from {stats.n_concept} concept and {stats.n_keep} preserved vectors "
                        f"(largest SVD error {worst:.2e} of the edit)")
    return deltas


# ---------------------------------------------------------------------------- vectors from an erasure

def _encode_each(backend, prompts, tokens):
    from .tokens import encode

    out = [None] * len(prompts)
    for tok in {id(t): t for t in tokens}.values():
        index = [i for i, t in enumerate(tokens) if t is tok]
        for i, cond in zip(index, encode(backend, [prompts[i] for i in index], tok)):
            out[i] = cond
    return torch.stack(out)


def vectors_after_erasure(backend, deltas, prompts: list[str], tokens: list, targets: torch.Tensor,
                          negative_guidance: float, keep: list[str], chunk: int = 32) -> Statistics:
    """Statistics for the edit after a contextual erasure (see the module doc for the choice of vectors).

    ``targets`` [n, L, d] are the contextual method's frozen targets for ``prompts`` (negative guidance
    ``negative_guidance`` included: it is taken out here); ``deltas`` the trained text-encoder deltas."""
    from .tokens import encode

    stats = Statistics(int(backend.width))
    with torch.no_grad(), deltas.inject(backend.linear):
        for start in range(0, len(prompts), chunk):
            part, toks = prompts[start:start + chunk], tokens[start:start + chunk]
            erased = _encode_each(backend, part, toks).float()
            with deltas.off():
                clean = _encode_each(backend, part, toks).float()
            target = targets[start:start + chunk].to(clean.device).float()
            anchor = (target + negative_guidance * clean) / (1 + negative_guidance)
            differs = (target - clean).norm(dim=-1) > 1e-4 * clean.norm(dim=-1).clamp_min(1e-12)  # [n, L]
            first = differs.float().argmax(1)  # the concept's first position (the first True)
            first[~differs.any(1)] = differs.shape[1]  # concept and target equal: nothing to edit
            positions = torch.arange(differs.shape[1], device=differs.device)[None] >= first[:, None]
            stats.add_concept(erased[positions], anchor[positions])
            stats.add_concept(clean[positions], anchor[positions])
        for start in range(0, len(keep), chunk):
            stats.add_keep(encode(backend, keep[start:start + chunk]).float())
        stats.add_empty(encode(backend, [""]).float())
    return stats


def after_erasure(backend, config, deltas, prompts, tokens, targets, keep,
                  earlier: tuple[KVDeltas, ...] = ()) -> KVDeltas:
    """The UNet key/value edit that completes a contextual erasure (``EraseConfig.unet_kv_edit``); ``earlier``: the
    UNet edits of earlier erasures, already applied (see ``edit``)."""
    modules = kv_modules(backend)
    stats = vectors_after_erasure(backend, deltas, prompts, tokens, targets, config.negative_guidance, keep)
    return edit(modules, stats, config.kv_preserve_weight, config.kv_ridge, config.kv_rank, config.seed,
                config.empty_weight, earlier)
