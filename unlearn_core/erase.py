"""Unlearn Concept LoRA: train text-encoder deltas that erase a concept and keep the rest."""
from __future__ import annotations

import copy
import re
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, NamedTuple, Sequence

import torch

from . import kv_edit, objectives
from .backend import Backend
from .config import CONDITIONING_METHODS, Concept, EraseConfig, TokenConfig
from .contexts import build_contexts, erase_pairs, fill, keep_prompts
from .inversion import encode_latents, learn_token
from .kv_edit import KVDeltas
from .lora import Deltas, target_shapes
from .neighbours import Spread, distances_to_concept, pairwise_distances, phrasings_of, pulled_onto_concept
from .prompt_cache import CACHES, PromptEncoder
from .prompts import ordinary_words, sample_prompts
from .targets import resolve_targets
from .tokens import ConceptToken, encode
from .train import (Callback, PassCounter, StepInfo, conflict_free_backward, grad_scaler, noisy_batch, plain_backward,
                    run, training_context)

if TYPE_CHECKING:
    from .continual import Earlier

NOISE_ONLY_LATENT_SIZE = 64  # latent side used by the anchor term when no images are given (SD2-base: 64)


@dataclass
class EraseResult:
    deltas: Deltas
    config: EraseConfig
    history: list[dict[str, float]]
    seconds: float
    unet_calls: int  # UNet forward calls (with gradients or frozen)
    unet_samples: int  # the samples those calls carried (calls x batch)
    token: str | None = None
    notes: list[str] = field(default_factory=list)
    unet_deltas: KVDeltas | None = None  # the UNet cross-attention key/value edit (EraseConfig.unet_kv_edit)
    after: tuple[str, ...] = ()  # continual erasure: the concepts of the earlier adapters this one was made after
    neighbour_targets: dict[str, str] = field(default_factory=dict)  # contextual: the neighbour each concept became

    def info(self) -> dict:
        """What the adapter file records about how it was made."""
        c, lora = self.config, self.config.lora
        concepts = {} if not c.also else {  # a joint erasure: "concept" names them all, as a stack's file does
            "concept": c.concept_label, "concepts": [k.name for k in c.concepts],
            "synonyms": [s for k in c.concepts for s in k.synonyms],
            "concept_synonyms": {k.name: list(k.synonyms) for k in c.concepts}}
        return {
            "concept": c.concept, "synonyms": list(c.synonyms), **concepts, "token": self.token or "",
            "method": c.method,
            "kind": c.kind, "anchor": c.anchor, "steps": c.steps, "lr": c.lr, "seed": c.seed,
            "targets": lora.preset if not lora.targets else list(lora.targets),
            "weights": {"ascent": c.ascent_weight, "anchor": c.anchor_weight, "preserve": c.preserve_weight,
                        **({"update": c.update_weight} if self.after else {})},
            **({"after": list(self.after)} if self.after else {}),
            "gradient_surgery": c.gradient_surgery,
            "final_losses": self.history[-1] if self.history else {},
            "seconds": round(self.seconds, 2), "unet_calls": self.unet_calls,
            "unet_samples": self.unet_samples,
        } | ({"notes": list(self.notes)} if self.notes else {}) | (
            {"neighbour_targets": dict(self.neighbour_targets)} if self.neighbour_targets else {}) | (
            {"compression": self.compression()} if self.deltas.compression_error is not None else {})

    def compression(self) -> dict:
        """How far the saved LoRA is from the full-weight deltas it was compressed from (relative Frobenius error)."""
        error = self.deltas.compression_error
        return {"rank": self.deltas.rank, "method": "randomised SVD", "relative_error": round(error["total"], 6),
                "max_module_relative_error": round(error["max_module"], 6)}


def mentions(text: str, phrases) -> bool:
    """Whether ``text`` holds one of ``phrases`` as whole words (case and spacing aside)."""
    text = " ".join(text.split()).casefold()
    return any(re.search(rf"(?<!\w){re.escape(' '.join(p.split()).casefold())}(?!\w)", text)
               for p in phrases if p.strip())


class Share(NamedTuple):
    """One concept's part of a contextual run: the contexts it is erased in and the neighbours it becomes there."""

    concept: Concept
    contexts: list[str]
    neighbours: tuple[str, ...]


def concept_shares(config: EraseConfig) -> tuple[list[Share], list[str], list[str]]:
    """Each concept's share (its contexts: its captions, their cross-overs and its kind's templates; its
    neighbours) and the keep prompts: the union over concepts of its contexts with each of its neighbours, then
    the preserve prompts. A joint erasure leaves out what names one of its concepts (``leave_out_concepts``).
    Returns them and notes to show."""
    shares = [Share(c, build_contexts(c.contexts, c.kind, config.max_contexts, config.seed), c.keep)
              for c in config.concepts]
    keep = list(dict.fromkeys([p for s in shares for p in keep_prompts(s.contexts, s.neighbours, config.preserve)]
                              + unrelated_prompts(config, shares)))
    return leave_out_concepts(config, shares, keep) if config.also else (shares, keep, [])


def unrelated_prompts(config: EraseConfig, shares: list[Share]) -> list[str]:
    """Each share's contexts with the slot empty and with ``unrelated_words`` ordinary words in it (none that is or
    holds a phrase of a concept), as keep prompts that are never a target: what the concept's move must not drag."""
    if not config.unrelated_words:
        return []
    phrases = [p for c in config.concepts for p in c.phrases]
    words = [w for w in ordinary_words(config.seed)
             if not mentions(w, phrases) and not any(mentions(p, [w]) for p in phrases)][:config.unrelated_words]
    return list(dict.fromkeys(fill(c, w) for s in shares for c in s.contexts for w in ["", *words]))


def leave_out_concepts(config: EraseConfig, shares: list[Share], keep: list[str]):
    """A joint erasure's shares and keep prompts without any context, neighbour or keep prompt that names one of its
    concepts (outside the slot): "a {} next to a dog" would map "a cat next to a dog" onto a dog, and "a bird next
    to a dog" would keep the dog; no concept of the list is another's target, neighbour or kept prompt. Returns
    them and notes to show."""
    phrases = [p for c in config.concepts for p in c.phrases]
    if config.anchor and mentions(config.anchor, phrases):
        raise ValueError(f"anchor: {config.anchor!r} names a concept to erase; the anchor is what every concept "
                         "becomes, so it must name none of them (or leave it empty)")
    kept_shares = []
    for concept, contexts, neighbours in shares:
        kept_contexts = [c for c in contexts if not mentions(fill(c, ""), phrases)]
        if not kept_contexts:
            field_name = "contexts" if concept.contexts == config.contexts else f"contexts of {concept.name!r}"
            raise ValueError(f"{field_name}: every context names one of the concepts to erase outside its '{{}}' slot; "
                             "give contexts whose only concept is the slot, e.g. 'a {} on a table'")
        kept_shares.append(Share(concept, kept_contexts, tuple(k for k in neighbours if not mentions(k, phrases))))

    def left_out(part: str) -> int:  # distinct contexts (or neighbours) left out, over every share
        return len({x for s in shares for x in getattr(s, part)} - {x for s in kept_shares for x in getattr(s, part)})

    kept = [k for k in keep if not mentions(k, phrases)]
    counts = ((left_out("contexts"), "context(s)"), (left_out("neighbours"), "neighbour(s)"),
              (len(keep) - len(kept), "keep/preserve prompt(s)"))
    return kept_shares, kept, [f"{n} {what} naming one of the concepts left out" for n, what in counts if n]


def joint_prompts(config: EraseConfig, contexts: list[str], keep: list[str]):
    """``leave_out_concepts`` for one list of contexts and of neighbours (``config.keep``) shared by every concept:
    the contexts, keep prompts and neighbours left, and notes."""
    (share,), kept, notes = leave_out_concepts(config, [Share(config.concepts[0], contexts, config.keep)], keep)
    return share.contexts, kept, share.neighbours, notes


def erase_subjects(config: EraseConfig, token: ConceptToken | None) -> list[str]:
    subjects = [config.concept.strip(), *config.synonyms]
    return subjects + ([token.name] if token is not None else [])


def _noise_only_batch(backend: Backend, batch_size: int, generator: torch.Generator):
    """No images: pure-noise latents at high timesteps, where the prompt decides the layout."""
    size = getattr(backend, "latent_size", NOISE_ONLY_LATENT_SIZE)
    schedule = backend.schedule
    x_t = torch.randn(batch_size, 4, size, size, generator=generator).to(backend.device)
    t = torch.randint(schedule.num_timesteps // 2, schedule.num_timesteps, (batch_size,), generator=generator)
    return None, None, t.to(backend.device), x_t


def erase(backend: Backend, config: EraseConfig, images: torch.Tensor | None = None,
          token: ConceptToken | None = None, callback: Callback | None = None, cache=CACHES,
          earlier: "Earlier | Sequence[Earlier]" = ()) -> EraseResult:
    """Train deltas that erase ``config.concept`` (plus synonyms and ``token``) from the text encoder.

    ``cache`` (contextual method): what its steps reuse, see ``prompt_cache`` ("ids": token ids, "layers": the
    frozen lower layers' output when the deltas sit only on upper layers); ``()`` is the plain path, same result.
    ``earlier`` (contextual method; continual erasure): adapters already made (``continual.read_earlier``). For the
    whole run their deltas are applied (frozen), so every target is the model with the earlier erasures; their
    concepts in this run's contexts are kept where they put them, and ``update_weight`` x the new deltas' relative
    squared size keeps the update small. The result holds the new deltas only (``continual.grown`` stacks them)."""
    earlier = [earlier] if hasattr(earlier, "deltas") else list(earlier)
    if config.method in CONDITIONING_METHODS:
        return _erase_in_conditioning_space(backend, config, images, token, callback, cache, earlier)
    if earlier:
        raise ValueError(f"earlier: erasing after earlier adapters is an option of the contextual method, not "
                         f"{config.method!r}")
    if config.needs_images and (images is None or len(images) == 0):
        raise ValueError(f"method {config.method!r} needs example images of the concept; "
                         "give 4-5 images, or use method 'anchor'")
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed)
    deltas = _new_deltas(backend, config)
    token = ConceptToken(token.name, token.vectors.detach()) if token is not None else None
    subjects = erase_subjects(config, token)
    counter = PassCounter(backend)
    use_ascent = config.method in ("fewshot", "weighted") and config.ascent_weight > 0
    use_anchor = config.method in ("anchor", "weighted") and config.anchor_weight > 0
    use_preserve = config.preserve_weight > 0 and len(config.preserve) > 0

    with training_context(backend), deltas.inject(backend.linear):
        latents = encode_latents(backend, images) if images is not None and len(images) else None
        with torch.no_grad(), deltas.off():
            anchor_cond = encode(backend, [config.anchor]) if use_anchor else None
            preserve_cond = encode(backend, list(config.preserve)) if use_preserve else None

        def loss_fn(_step):
            if latents is not None:
                x0, noise, t, x_t = noisy_batch(latents, backend.schedule, config.batch_size, generator)
            else:
                x0, noise, t, x_t = _noise_only_batch(backend, config.batch_size, generator)
            prompts = sample_prompts(subjects, config.kind, config.batch_size, generator)
            prediction = counter(x_t, t, encode(backend, prompts, token))
            terms = {}
            erase_loss = torch.zeros((), device=prediction.device)
            keep_loss = torch.zeros((), device=prediction.device)
            if use_anchor:
                with torch.no_grad(), deltas.off():
                    anchor_prediction = counter(x_t, t, anchor_cond.expand(len(prompts), -1, -1))
                terms["anchor"] = objectives.anchor(prediction, anchor_prediction)
                erase_loss = erase_loss + config.anchor_weight * terms["anchor"]
            if use_ascent and x0 is not None:
                target = backend.schedule.target(x0, noise, t)
                # with an anchor prediction at hand the ascent is bounded by it; fewshot stays the paper's -MSE
                terms["ascent"] = (objectives.bounded_ascent(prediction, target, anchor_prediction) if use_anchor
                                   else objectives.ascent(prediction, target))
                erase_loss = erase_loss + config.ascent_weight * terms["ascent"]
            if use_preserve:
                terms["preserve"] = objectives.preserve(encode(backend, list(config.preserve)), preserve_cond)
                keep_loss = keep_loss + config.preserve_weight * terms["preserve"]
            if config.gradient_surgery:
                terms.update(erase=erase_loss, keep=keep_loss)
            terms["loss"] = erase_loss + keep_loss
            return terms

        optimizer = torch.optim.Adam(deltas.parameters(), lr=config.lr, betas=tuple(config.betas))
        backward = conflict_free_backward if config.gradient_surgery else plain_backward
        history = run(loss_fn, deltas.parameters(), optimizer, config.steps, callback, backward, grad_scaler(backend))
    return _result(deltas, config, history, start, counter, token)


def _new_deltas(backend: Backend, config: EraseConfig) -> Deltas:
    lora = config.lora
    targets = resolve_targets(lora.preset, backend.num_layers, lora.last_k, lora.targets)
    deltas = Deltas(target_shapes(backend.linear, targets), lora.mode, lora.rank, lora.alpha, config.seed)
    return deltas.to(backend.device)


def _result(deltas: Deltas, config: EraseConfig, history, start: float, counter: PassCounter | None,
            token: ConceptToken | None, notes=()) -> EraseResult:
    notes = list(notes)
    if config.lora.compress_rank:  # on the training device, before the deltas leave it
        deltas = deltas.compress(config.lora.compress_rank, seed=config.seed)
        notes.append(f"full-weight deltas compressed to a rank-{config.lora.compress_rank} LoRA by SVD (randomised; "
                     f"relative error {deltas.compression_error['total']:.3g})")
    deltas = deltas.cpu()
    calls, samples = (counter.calls, counter.samples) if counter else (0, 0)
    return EraseResult(deltas, config, history, time.perf_counter() - start, calls, samples,
                       token.name if token else None, notes)


class _Counting:
    """One step count over the training phases and adversarial-token phases of a run, for progress bars."""

    def __init__(self, callback: Callback | None, total: int):
        self.callback, self.total, self.done = callback, total, 0

    def __call__(self, info: StepInfo) -> None:
        self.done += 1
        if self.callback is not None:
            self.callback(StepInfo(self.done, self.total, info.losses))


def _adversarial_token(backend: Backend, deltas: Deltas, config: EraseConfig, images: torch.Tensor, round_: int,
                       callback: Callback):
    """A token learned on the model as erased so far (the re-learning attack, run inside the erasure)."""
    captions = config.contexts if len(config.contexts) == len(images) else ()
    token_config = TokenConfig(token=f"<adversary-{round_}>", n_vectors=config.adversarial_vectors,
                               steps=config.adversarial_steps, lr=2e-2, seed=config.seed + round_,
                               kind=config.kind, captions=captions)
    flags = [(p, p.requires_grad) for p in deltas.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)  # the attack moves only its own vectors
        return learn_token(backend, images, token_config, callback)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def earlier_keep(config: EraseConfig, earlier: "Sequence[Earlier]", shares: list[Share]) -> list[str]:
    """The earlier adapters' concepts (names, synonyms) in each of this run's contexts: kept at their conditioning
    on the model with the earlier erasures, i.e. kept erased. Refuses a concept of this run erased earlier."""
    phrases = list(dict.fromkeys(p for e in earlier for p in e.phrases))
    own = [p for c in config.concepts for p in c.phrases]
    again = [p for p in phrases if mentions(p, own)]  # its keep prompts would name this run's concept
    if again:
        raise ValueError(f"earlier: {again[0]!r} was erased by an earlier adapter and overlaps a concept of this run "
                         f"({config.concept_label!r}); erase each concept once (remove it from the stack first to "
                         "erase it again)")
    return list(dict.fromkeys(fill(c, p) for s in shares for c in s.contexts for p in phrases))


def continual_targets(shares: list[Share], earlier: "Sequence[Earlier]", clean: list[torch.Tensor],
                      now: list[torch.Tensor], between: list[torch.Tensor] | None = None
                      ) -> tuple[list[Share], list[tuple[str, ...]], list[str]]:
    """After ``earlier`` erasures: the shares with the neighbours a concept may still go to, the neighbours that
    go with it, and notes. ``clean`` and ``now``: each share's neighbours' distances to its concept without and
    with the earlier erasures applied.

    A neighbour erased earlier by name is kept erased (``earlier_keep``) but never a target: it would send the
    concept where the earlier erasure sent it, which for mutual nearest neighbours (red, then orange) is the concept
    itself. A neighbour the earlier erasures pulled onto the concept (``neighbours.PULLED``: yellow sent to orange,
    and "lemon", a phrasing of yellow the engine was not told, with it) renders as the concept: never a target,
    and erased with the concept, onto its target. A neighbour far nearer a concept erased earlier than any other
    word (``between``: the clean distances among the neighbours and the concept, last; ``neighbours.PHRASING_OF``)
    is taken for a phrasing of it that the earlier file does not name ("scarlet" beside red): kept, never a target.
    A concept an earlier erasure sent to a phrasing of this one (its part records the neighbour: red to "tangerine",
    then orange erased) renders as this concept where it was kept erased: it goes with the concept too."""
    phrases = [p for e in earlier for p in e.phrases]
    trimmed, followers, named, untold = [], [], set(), set()
    for index, (share, before, after) in enumerate(zip(shares, clean, now)):
        follow = tuple(k for k, pulled in zip(share.neighbours, pulled_onto_concept(before, after)) if pulled)
        sent_here = [words for e in earlier for words, target in e.sent if mentions(target, share.concept.phrases)]
        follow = tuple(dict.fromkeys([*follow, *(w for words in sent_here for w in words)]))
        erased = {k for k in share.neighbours if mentions(k, phrases)} - set(follow)
        beside = set()
        if between is not None:
            marks = phrasings_of(between[index], [k in erased or k in follow for k in share.neighbours] + [False])
            beside = {k for k, mark in zip(share.neighbours, marks) if mark}
        left_out = erased | beside | set(follow)
        trimmed.append(share._replace(neighbours=tuple(k for k in share.neighbours if k not in left_out)))
        followers.append(follow)
        named |= erased
        untold |= beside
    notes = [f"neighbour(s) erased earlier kept erased, never a target: {', '.join(sorted(named))}"] if named else []
    notes += [f"neighbour(s) taken for phrasings of a concept erased earlier, never a target: "
              f"{', '.join(sorted(untold))}"] if untold else []
    notes += [f"neighbour(s) the earlier erasures pulled or sent onto {s.concept.name!r}, erased with it: "
              f"{', '.join(f)}" for s, f in zip(shares, followers) if f]
    return trimmed, followers, notes


def _neighbour_distances(encoder: PromptEncoder, shares: list[Share]) -> list[torch.Tensor]:
    """Each share's neighbours' distances to its concept (frozen conditioning: call with new deltas off, no_grad)."""
    return [distances_to_concept(lambda p: encoder.frozen(p, remember=False), s.contexts, s.neighbours,
                                 s.concept.name) for s in shares]


@contextmanager
def applied_earlier(backend: Backend, earlier: "Sequence[Earlier]") -> Iterator[None]:
    """The earlier adapters applied for the block: their text-encoder deltas (frozen copies on the backend's device)
    and UNet key/value edits, through hooks removed on exit; the model's modules are never written."""
    with ExitStack() as stack:
        for e in earlier:
            deltas = copy.deepcopy(e.deltas).to(backend.device).requires_grad_(False)
            stack.enter_context(deltas.inject(backend.linear))
            if e.unet is not None:
                stack.enter_context(kv_edit.applied(e.unet, backend))
        yield


def _erase_in_conditioning_space(backend: Backend, config: EraseConfig, images: torch.Tensor | None,
                                 token: ConceptToken | None, callback: Callback | None, cache=CACHES,
                                 earlier: "Sequence[Earlier]" = ()) -> EraseResult:
    """The contextual method: text encoder in, text encoder out; the frozen UNet is never called, except by the
    adversarial tokens of the robust option (``adversarial_rounds``), learned on the model as erased so far.
    With ``earlier`` adapters (see ``erase``) everything runs on the model with them applied."""
    if config.adversarial_rounds and (images is None or len(images) == 0):
        raise ValueError("adversarial_rounds: the robust option learns attack tokens from the example images; "
                         "give 4-5 images, or set adversarial_rounds to 0")
    start = time.perf_counter()
    planned = concept_shares(config)  # several concepts: each in its own contexts
    clean = None
    if earlier:  # the neighbours' distances to the concept before the earlier erasures (see continual_targets)
        with training_context(backend), torch.no_grad():
            encoder = PromptEncoder(backend, cache=())
            between = [pairwise_distances(lambda p: encoder.frozen(p, remember=False), s.contexts,
                                          (*s.neighbours, s.concept.name)) for s in planned[0]]
        clean = ([b[:-1, -1] for b in between], between)  # the last column: each neighbour to the concept
    with applied_earlier(backend, earlier):
        return _contextual(backend, config, images, token, callback, cache, earlier, planned, clean, start)


def _contextual(backend: Backend, config: EraseConfig, images: torch.Tensor | None, token: ConceptToken | None,
                callback: Callback | None, cache, earlier: "Sequence[Earlier]", planned, clean, start) -> EraseResult:
    generator = torch.Generator().manual_seed(config.seed)
    deltas = _new_deltas(backend, config)
    token = ConceptToken(token.name, token.vectors.detach()) if token is not None else None
    shares, keep, joint_notes = planned
    kept_erased = earlier_keep(config, earlier, shares) if earlier else []
    keep = list(dict.fromkeys(keep + kept_erased))
    regularise = bool(earlier) and config.update_weight > 0
    erase_prompts, erase_tokens, target_parts = [], [], []
    encoder = PromptEncoder(backend, min(t.layer for t in deltas.targets), cache)  # tokenizes each prompt once
    counting = _Counting(callback, config.total_steps)
    unet = PassCounter(backend)
    history = []

    neighbour_targets: dict[int, torch.Tensor] = {}  # per share: its contexts' target (one row per context)
    target_notes: list[str] = []
    chosen_targets: dict[str, str] = {}

    def neighbour_target(index: int) -> torch.Tensor:
        """In each context of share ``index`` its concept becomes one of its neighbours (the nearest, the most
        typical) or their average (``neighbour_target``; see ``neighbours``)."""
        share = shares[index]
        if index not in neighbour_targets:
            spread, words = Spread(len(share.neighbours)), (*share.neighbours, share.concept.name)

            def add(context: str) -> torch.Tensor:  # the neighbours, then the concept, in one context
                conditioning = encoder.frozen([fill(context, w) for w in words], remember=False)
                return spread.add(*conditioning.split([len(share.neighbours), 1]))
            means = torch.stack([add(c) for c in share.contexts])
            chosen = spread.choice(config.neighbour_target)
            if chosen is not None:
                means = encoder.frozen([fill(c, share.neighbours[chosen]) for c in share.contexts], remember=False)
                chosen_targets[share.concept.name] = share.neighbours[chosen]
                target_notes.append(f"{share.concept.name!r} becomes its {config.neighbour_target} neighbour "
                                    f"{share.neighbours[chosen]!r}")
            neighbour_targets[index] = means
        return neighbour_targets[index]

    def anchor_conditioning(index: int, pairs: list[tuple[str, str]], per_context: int) -> torch.Tensor:
        if config.anchor or not shares[index].neighbours:  # frozen only: nothing of theirs is kept for training passes
            return encoder.frozen([anchor for _, anchor in pairs], remember=False)
        # no anchor named, neighbours known: not the bare context, which a model may still render as the concept
        return neighbour_target(index).repeat_interleave(per_context, dim=0)

    def add_subjects(index: int, subjects: list[str], tok: ConceptToken | None) -> None:
        pairs = erase_pairs(shares[index].contexts, subjects, config.anchor)
        prompts = [prompt for prompt, _ in pairs]
        with torch.no_grad(), deltas.off():
            target_parts.append(objectives.negative_target(
                anchor_conditioning(index, pairs, len(subjects)), encoder.frozen(prompts, tok),
                config.negative_guidance))
        erase_prompts.extend(prompts)
        erase_tokens.extend([tok] * len(prompts))

    with training_context(backend), deltas.inject(backend.linear):
        followers, continual_notes = [()] * len(shares), []
        if earlier:
            with torch.no_grad(), deltas.off():
                now = _neighbour_distances(encoder, shares)
            shares, followers, continual_notes = continual_targets(shares, earlier, clean[0], now, clean[1])
            erased_with = {fill(c, k) for s, f in zip(shares, followers) for c in s.contexts for k in f}
            keep = [p for p in keep if p not in erased_with]
        for index, share in enumerate(shares):  # each concept as a single erasure of its share would build it
            add_subjects(index, [*share.concept.phrases, *followers[index]], None)
        if token is not None:  # the token (and the robust option's tokens) stand for the first concept
            add_subjects(0, [token.name], token)
        with torch.no_grad(), deltas.off():
            keep_cond = encoder.frozen(keep) if keep else None
            empty_cond = encoder.frozen([""])
            encoder.check()
            scale = target_parts[0].float().pow(2).mean()
            weight_norm = sum(float(backend.linear(t).weight.float().pow(2).sum()) for t in deltas.targets) \
                if regularise else 1.0
        joined = []  # the targets of every erase prompt in one tensor, joined again only when a phase adds some

        def loss_fn(_step):
            if not joined or len(joined[0]) != len(erase_prompts):
                joined[:] = [torch.cat(target_parts)]
            targets = joined[0]
            erase_index = torch.randperm(len(erase_prompts), generator=generator)[:config.prompt_batch].tolist()
            keep_index = torch.randperm(len(keep), generator=generator)[:config.prompt_batch] if keep else []
            cond = encoder([erase_prompts[i] for i in erase_index] + [keep[i] for i in keep_index] + [""],
                           [erase_tokens[i] for i in erase_index] + [None] * (len(keep_index) + 1))
            n_erase, n_keep = len(erase_index), len(keep_index)
            terms = {"erase": objectives.conditioning_match(cond[:n_erase], targets[erase_index], scale),
                     "empty": objectives.conditioning_match(cond[-1:], empty_cond, scale)}
            loss = terms["erase"] + config.empty_weight * terms["empty"]
            if n_keep:
                terms["keep"] = objectives.conditioning_match(cond[n_erase:n_erase + n_keep], keep_cond[keep_index],
                                                              scale)
                loss = loss + config.preserve_weight * terms["keep"]
            if regularise:  # continual erasure: the new update stays small next to the weights it adapts
                terms["update"] = deltas.squared_norm() / max(weight_norm, 1e-30)
                loss = loss + config.update_weight * terms["update"]
            terms["loss"] = loss
            return terms

        optimizer = torch.optim.Adam(deltas.parameters(), lr=config.lr, betas=tuple(config.betas))
        scaler = grad_scaler(backend)  # one for the run: its scale carries over between phases
        phases = _split(config.steps, config.adversarial_rounds + 1)
        for round_, steps in enumerate(phases):
            if round_:
                learned = _adversarial_token(backend, deltas, config, images, round_, counting)
                unet.calls, unet.samples = unet.calls + learned.unet_calls, unet.samples + learned.unet_samples
                add_subjects(0, [learned.token.name], learned.token)
            history += run(loss_fn, deltas.parameters(), optimizer, steps, counting, scaler=scaler)
    joint = [f"{len(config.concepts)} concepts erased jointly: {config.concept_label}"] if config.also else []
    after = tuple(dict.fromkeys(c for e in earlier for c in e.concepts))
    if earlier:
        joint.append(f"erased after {len(after)} earlier concept(s) ({', '.join(after)}), applied throughout; "
                     f"{len(kept_erased)} prompts of theirs kept erased"
                     + (f", update regulariser weight {config.update_weight:g}" if regularise else ""))
    contexts = {c for share in shares for c in share.contexts}
    notes = (joint + joint_notes + continual_notes + target_notes + encoder.notes
             + [f"erased in {len(contexts)} contexts ({len(erase_prompts)} prompts), kept {len(keep)} prompts and "
                "the empty one"]
             + ([f"{config.adversarial_rounds} adversarial token(s) learned and erased"]
                if config.adversarial_rounds else []))
    unet_deltas = kv_edit.after_erasure(backend, config, deltas, erase_prompts, erase_tokens, torch.cat(target_parts),
                                        keep, tuple(e.unet for e in earlier if e.unet is not None)
                                        ) if config.unet_kv_edit else None
    result = _result(deltas, config, history, start, unet, token, notes + (unet_deltas.notes if unet_deltas else []))
    result.unet_deltas, result.after, result.neighbour_targets = unet_deltas, after, chosen_targets
    return result


def _split(total: int, parts: int) -> list[int]:
    """``total`` steps in ``parts`` phases, as equal as possible."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]
