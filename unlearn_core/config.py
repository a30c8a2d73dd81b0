"""Run configurations: dataclasses validated at construction, errors name the field."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from .neighbours import TARGETS
from .targets import PRESETS, Target
from .tokens import check_token_name

METHODS = ("contextual", "weighted", "fewshot", "anchor")
CONDITIONING_METHODS = ("contextual",)  # methods that need no UNet pass: the UNet is frozen, so matching the
# conditioning a prompt should have gives the prediction it should have
DEFAULT_PRESERVE = ("a photo", "a painting", "a photo of a person", "a landscape", "an animal", "")
KINDS = ("object", "style")  # prompt templates (a concept's kind)
OWN_FIELDS = ("contexts", "keep", "kind")  # what a concept of a joint erasure may give for itself


def _require(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{name}: {message}")


@dataclass(frozen=True)
class LoraConfig:
    """Which projections get deltas and what shape they have.

    mode "lora": low-rank deltas (small files). mode "full": dense deltas of the whole weight
    (full fine-tuning of those weights; files as large as the weights unless ``compress_rank``
    turns the result into a LoRA by SVD).
    """

    preset: str = "fewshot"
    last_k: int = 1
    targets: tuple[str, ...] = ()
    mode: str = "lora"
    rank: int = 4
    alpha: float | None = None
    compress_rank: int | None = None

    def __post_init__(self):
        _require(self.preset in PRESETS, "preset", f"must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        _require(self.last_k >= 1, "last_k", f"must be >= 1, got {self.last_k}")
        _require(self.mode in ("lora", "full"), "mode", f"must be 'lora' or 'full', got {self.mode!r}")
        _require(1 <= self.rank <= 1024, "rank", f"must be between 1 and 1024, got {self.rank}")
        _require(self.alpha is None or self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
        _require(self.compress_rank is None or self.compress_rank >= 1, "compress_rank", "must be >= 1")
        _require(self.compress_rank is None or self.mode == "full", "compress_rank",
                 "only applies to mode 'full' (a LoRA is already low-rank)")
        for t in self.targets:
            try:
                Target.parse(t)
            except ValueError as error:
                raise ValueError(f"targets: {error}") from None


@dataclass(frozen=True)
class TokenConfig:
    """Textual inversion: learn ``n_vectors`` embeddings for a new token."""

    token: str
    n_vectors: int = 1
    init_word: str = "object"
    kind: str = "object"  # prompt templates: "object" or "style"
    steps: int = 200
    lr: float = 5e-3
    batch_size: int = 2
    seed: int = 0
    # one prompt per example image with "{}" where the token goes (as A1111's [filewords]); empty: templates
    captions: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "captions", tuple(self.captions))
        for caption in self.captions:
            _require("{}" in caption, "captions",
                     f"each caption needs '{{}}' where the token goes, e.g. 'a {{}} on a table'; got {caption!r}")
        try:
            check_token_name(self.token)
        except ValueError as error:
            raise ValueError(f"token: {error}") from None
        _require(1 <= self.n_vectors <= 16, "n_vectors", f"must be between 1 and 16, got {self.n_vectors}")
        _require(bool(self.init_word.strip()), "init_word", "must be a word such as 'object' or 'style'")
        _require(self.kind in KINDS, "kind", f"must be 'object' or 'style', got {self.kind!r}")
        _require(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        _require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")


def _phrase_key(phrase: str) -> str:
    """How concept phrases are compared: case and surrounding/inner spacing do not make two phrases different."""
    return " ".join(phrase.split()).casefold()


def _check_contexts(contexts, name: str) -> None:
    for context in contexts:
        _require(context.count("{}") == 1, name,
                 f"each context needs one '{{}}' where the concept goes, e.g. 'a {{}} on a sofa'; got {context!r}")


@dataclass(frozen=True)
class Concept:
    """One concept of a joint erasure: its name as it appears in prompts and its other phrasings; optionally its
    own ``contexts`` ("{}"-slotted captions), ``keep`` (neighbours) and ``kind`` ("object"/"style"). ``None``: the
    EraseConfig's (``EraseConfig.concepts`` fills them in)."""

    name: str
    synonyms: tuple[str, ...] = ()
    contexts: tuple[str, ...] | None = None
    keep: tuple[str, ...] | None = None
    kind: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "name", self.name.strip())
        for field_name in ("synonyms", "contexts", "keep"):
            value, where = getattr(self, field_name), f"{field_name} of {self.name!r}"
            if value is None and field_name != "synonyms":
                continue
            _require(not isinstance(value, str), where, "give a list of phrases, not one string")
            _require(isinstance(value, (list, tuple)) and all(isinstance(x, str) for x in value), where,
                     f"give a list of phrases; got {value!r}")
            object.__setattr__(self, field_name, tuple(value))
        object.__setattr__(self, "synonyms", tuple(s.strip() for s in self.synonyms))
        _check_contexts(self.contexts or (), f"contexts of {self.name!r}")
        _require(all(k.strip() for k in self.keep or ()), f"keep of {self.name!r}", "contains an empty entry")
        _require(self.kind in (None, *KINDS), f"kind of {self.name!r}",
                 f"must be 'object' or 'style', got {self.kind!r}")

    @property
    def phrases(self) -> tuple[str, ...]:
        return (self.name, *self.synonyms)

    @classmethod
    def parse(cls, text: str) -> "Concept":
        """``"a cat"`` or ``"a cat=a kitten|a kitty"``: the name, then its synonyms after ``=``, split at ``|``."""
        name, has_synonyms, rest = text.partition("=")
        return cls(name, tuple(rest.split("|")) if has_synonyms else ())

    @classmethod
    def of(cls, value) -> "Concept":
        """A Concept from a Concept, a name, a (name, synonyms) pair or a mapping of its fields (name, synonyms,
        contexts, keep, kind: as a JSON file gives them); the forms EraseConfig.also takes."""
        if isinstance(value, Concept):
            return value
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[0], str):
            return cls(value[0], tuple(value[1]) if not isinstance(value[1], str) else value[1])
        if isinstance(value, dict) and isinstance(value.get("name"), str) and set(value) <= {
                "name", "synonyms", *OWN_FIELDS}:
            return cls(**value)
        raise ValueError(f"also: each entry is a concept name, a (name, synonyms) pair, a Concept or a mapping of "
                         f"name, synonyms, contexts, keep, kind; got {value!r}")


@dataclass(frozen=True)
class EraseConfig:
    """Unlearn a concept: a weighted sum of erase terms and a preserve term.

    method "fewshot":  gradient ascent on the denoising loss of the example images (Fuchi & Takagi 2024).
    method "anchor":   the concept prompts' prediction is pulled to the frozen model's for ``anchor``.
    method "weighted": both erase terms, weighted by ``ascent_weight`` and ``anchor_weight``.
    method "contextual": in conditioning space, no UNet pass. In every context (``contexts``: prompts with a
        "{}" slot, e.g. the example images' captions, plus their cross-overs and templates) the prompt with the
        concept is mapped to the frozen conditioning of the same prompt with ``anchor`` in the slot (no anchor
        and a keep list: the average of the prompts with each neighbour in the slot), pushed
        ``negative_guidance`` times further away from the concept; the same contexts with each ``keep`` word
        (the concept's neighbours) and the empty prompt keep their frozen conditioning.
    All methods add ``preserve_weight`` x (keep the frozen conditioning of ``preserve`` prompts).
    ``gradient_surgery`` (DoCo): drop the part of the erase gradient that conflicts with the keep gradient.
    ``also`` (contextual only): more concepts erased jointly in the same run, each a name, a (name, synonyms) pair
    or a ``Concept``; ``concept``/``synonyms`` stay the first concept, ``concepts`` lists them all. A ``Concept``
    may give its own ``contexts``, ``keep`` and ``kind`` (a colour's captions and other colours next to a shape's);
    the first concept's are ``contexts``, ``keep`` and ``kind``, which are also every other concept's default.
    """

    concept: str
    synonyms: tuple[str, ...] = ()
    method: str = "weighted"
    kind: str = "object"
    anchor: str | None = None  # None: "" (the concept's words dropped) for contextual, "a photo" otherwise
    preserve: tuple[str, ...] = DEFAULT_PRESERVE
    steps: int = 60
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    batch_size: int = 2
    ascent_weight: float = 1.0
    anchor_weight: float = 1.0
    preserve_weight: float = 1.0
    gradient_surgery: bool = False
    seed: int = 0
    lora: LoraConfig = field(default_factory=LoraConfig)
    contexts: tuple[str, ...] = ()
    keep: tuple[str, ...] = ()
    negative_guidance: float = 1.0
    # contextual, no anchor: where the concept goes in each context ("nearest": the keep neighbour nearest the
    # concept; "typical": the one nearest the neighbours' average; "mean": that average; see neighbours.py)
    neighbour_target: str = "mean"
    # contextual: this many ordinary words (prompts.ORDINARY_WORDS, none naming the concept), and the empty slot, fill
    # every context as more keep prompts, so the words around the concept keep what they draw (0: off)
    unrelated_words: int = 0
    max_contexts: int = 48
    prompt_batch: int = 32  # prompts per step of each kind (erase, keep) for the conditioning-space method
    empty_weight: float = 10.0
    # robust option (contextual): this many rounds of a token learned against the adapter, then erased too
    adversarial_rounds: int = 0
    adversarial_steps: int = 100
    adversarial_vectors: int = 2
    # contextual, optional: a closed-form edit of the UNet's cross-attention key/value projections after the
    # text-encoder training (unlearn_core/kv_edit.py), saved in the same file as lora_unet_*attn2_to_k/to_v keys
    unet_kv_edit: bool = False
    kv_preserve_weight: float = 1.0  # lam: weight of the preserved vectors against the concept's
    kv_ridge: float = 1e-3  # mu: pull towards the unedited weights, relative to the concept vectors' mean square
    kv_rank: int = 16  # LoRA rank of each edited projection (truncated SVD beyond it; the error is recorded)
    also: tuple[Concept, ...] = ()  # contextual: more concepts erased jointly in the same run (see ``concepts``)
    # continual erasure (contextual, after earlier adapters: erase(..., earlier=...)): weight of the L2 regulariser
    # on the new deltas, sum ||dW||^2 / sum ||W||^2 over the adapted projections (unused without earlier adapters)
    update_weight: float = 0.1

    def __post_init__(self):
        for name in ("synonyms", "preserve", "contexts", "keep"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        _require(not isinstance(self.also, (str, Concept)), "also", "give a list of concepts, not a single one")
        object.__setattr__(self, "also", tuple(Concept.of(c) for c in self.also))
        if self.anchor is None:
            object.__setattr__(self, "anchor", "" if self.method == "contextual" else "a photo")
        _check_contexts(self.contexts, "contexts")
        _require(all(k.strip() for k in self.keep), "keep", "contains an empty entry")
        _require(self.negative_guidance >= 0, "negative_guidance", f"must be >= 0, got {self.negative_guidance}")
        _require(self.neighbour_target in TARGETS, "neighbour_target",
                 f"must be one of {', '.join(TARGETS)}, got {self.neighbour_target!r}")
        _require(self.max_contexts >= 1, "max_contexts", f"must be >= 1, got {self.max_contexts}")
        _require(0 <= self.adversarial_rounds <= 10, "adversarial_rounds", f"must be 0..10, got {self.adversarial_rounds}")
        _require(self.adversarial_rounds == 0 or self.method in CONDITIONING_METHODS, "adversarial_rounds",
                 "is an option of the contextual method")
        _require(self.adversarial_steps >= 1, "adversarial_steps", f"must be >= 1, got {self.adversarial_steps}")
        _require(1 <= self.adversarial_vectors <= 16, "adversarial_vectors",
                 f"must be 1..16, got {self.adversarial_vectors}")
        _require(isinstance(self.unet_kv_edit, bool), "unet_kv_edit", f"must be true or false, got {self.unet_kv_edit!r}")
        _require(not self.unet_kv_edit or self.method in CONDITIONING_METHODS, "unet_kv_edit",
                 "is an option of the contextual method")
        _require(self.unrelated_words >= 0, "unrelated_words", f"must be >= 0, got {self.unrelated_words}")
        _require(self.kv_preserve_weight >= 0, "kv_preserve_weight", f"must be >= 0, got {self.kv_preserve_weight}")
        _require(self.kv_ridge > 0, "kv_ridge", f"must be > 0 (it keeps the edit well-posed), got {self.kv_ridge}")
        _require(1 <= self.kv_rank <= 1024, "kv_rank", f"must be between 1 and 1024, got {self.kv_rank}")
        _require(self.prompt_batch >= 1, "prompt_batch", f"must be >= 1, got {self.prompt_batch}")
        _require(self.empty_weight >= 0, "empty_weight", f"must be >= 0, got {self.empty_weight}")
        _require(self.update_weight >= 0, "update_weight", f"must be >= 0, got {self.update_weight}")
        _require(bool(self.concept.strip()), "concept", "is empty; name the concept to erase, e.g. 'a red star'")
        _require(self.method in METHODS, "method", f"must be one of {', '.join(METHODS)}, got {self.method!r}")
        _require(self.kind in KINDS, "kind", f"must be 'object' or 'style', got {self.kind!r}")
        _require(all(s.strip() for s in self.synonyms), "synonyms", "contains an empty entry")
        _require(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        _require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "must be two numbers in [0, 1)")
        _require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        for name in ("ascent_weight", "anchor_weight", "preserve_weight"):
            _require(getattr(self, name) >= 0, name, "must be >= 0")
        _require(not (self.gradient_surgery and self.method in CONDITIONING_METHODS), "gradient_surgery",
                 f"applies to the UNet-loss methods, not {self.method!r}")
        _require(not self.gradient_surgery or (self.preserve_weight > 0 and len(self.preserve) > 0),
                 "gradient_surgery", "needs a preserve term (preserve prompts and preserve_weight > 0) to protect; "
                 "turn one of them on or turn gradient surgery off")
        self._check_concepts()

    def _check_concepts(self) -> None:
        """The list of concepts (one, or more with ``also``): names given, no phrase twice, none kept or anchored."""
        _require(not self.also or self.method in CONDITIONING_METHODS, "also",
                 f"erasing several concepts in one run is an option of the contextual method, not {self.method!r}; "
                 "use method 'contextual', or erase each concept on its own and stack the adapters (merge)")
        _require(not (self.also and self.adversarial_rounds), "also",
                 "the robust option (adversarial_rounds) learns one attack token from one concept's example images; "
                 "erase several concepts without it, or erase each concept on its own")
        for concept in self.also:
            _require(bool(concept.name), "also", "contains a concept with an empty name")
            _require(all(concept.synonyms), "also", f"synonyms of {concept.name!r} contain an empty entry")
        owner: dict[str, int] = {}  # phrase -> index of the concept that has it
        concepts = self.concepts
        for index, concept in enumerate(concepts):
            for phrase in concept.phrases:
                other = owner.setdefault(_phrase_key(phrase), index)
                if other != index:
                    where = ("named twice in the list of concepts" if _phrase_key(phrase) == _phrase_key(
                        concepts[other].name) and phrase == concept.name else
                        f"given for both {concepts[other].name!r} and {concept.name!r}")
                    raise ValueError(f"also: {phrase!r} is {where}; give each concept (and each synonym) once")
        own_keeps = [(f"keep of {c.name!r}", c.keep) for c in self.also if c.keep is not None]
        for name, keep in [("keep", self.keep), *own_keeps]:
            kept = [k for k in keep if _phrase_key(k) in owner]
            if kept:
                raise ValueError(f"{name}: {kept[0]!r} is one of the phrasings to erase (of "
                                 f"{concepts[owner[_phrase_key(kept[0])]].name!r}); a neighbour to keep must be "
                                 "something else")
        _require(not (self.anchor and _phrase_key(self.anchor) in owner), "anchor",
                 f"{self.anchor!r} is a concept to erase; the anchor is what the concepts become, so it must be "
                 "something else (or empty)")

    @property
    def concepts(self) -> tuple[Concept, ...]:
        """Every concept this run erases: the first (``concept`` with ``synonyms``), then ``also``; each with its
        own contexts, keep and kind, or the config's where it gives none (the first always has the config's)."""
        return tuple(replace(c, **{f: getattr(self, f) for f in OWN_FIELDS if getattr(c, f) is None})
                     for c in (Concept(self.concept, self.synonyms), *self.also))

    @property
    def concept_label(self) -> str:
        """The concepts' names for humans and file metadata: "a cat" or "a cat, a dog"."""
        return ", ".join(c.name for c in self.concepts)

    @property
    def needs_images(self) -> bool:
        return (self.method in ("fewshot", "weighted") and self.ascent_weight > 0) or self.adversarial_rounds > 0

    @property
    def total_steps(self) -> int:
        """Optimisation steps plus the adversarial tokens' steps: what a progress bar counts."""
        return self.steps + self.adversarial_rounds * self.adversarial_steps

    @classmethod
    def fewshot_paper(cls, concept: str, **overrides) -> "EraseConfig":
        """Fuchi & Takagi 2024's published settings: full weights of fc1/fc2 of every layer +
        self-attention of the last layer, Adam lr 1e-5 betas (0.9, 0.98), batch 2, 10 steps,
        no preserve term."""
        settings = dict(method="fewshot", steps=10, lr=1e-5, betas=(0.9, 0.98), batch_size=2,
                        preserve_weight=0.0, lora=LoraConfig(preset="fewshot", mode="full"))
        settings.update(overrides)
        return cls(concept=concept, **settings)
