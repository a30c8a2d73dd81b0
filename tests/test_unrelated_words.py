"""The unrelated-words option: ordinary words in the concept's slot are kept, never erased or a target."""
import torch

from unlearn_core.config import EraseConfig, LoraConfig
from unlearn_core.erase import concept_shares, erase
from unlearn_core.prompts import ORDINARY_WORDS
from unlearn_core.tokens import encode

CONTEXTS = ("a {} on a table", "a big {} in a room", "a small {} on grass")


def _config(**settings) -> EraseConfig:
    return EraseConfig(concept="red square", method="contextual", contexts=CONTEXTS, keep=("green circle",),
                       max_contexts=3, anchor="", **settings)


def test_unrelated_words_fill_every_context_and_never_name_the_concept():
    _, plain, _ = concept_shares(_config())
    _, with_words, _ = concept_shares(_config(unrelated_words=4, synonyms=("table",)))
    added = [p for p in with_words if p not in plain]
    assert "a on a table" in added  # the empty slot
    words = {p.split()[1] for p in added if p.startswith("a ") and p.endswith(" on a table") and p != "a on a table"}
    assert len(words) == 4 and words <= set(ORDINARY_WORDS) and "table" not in words  # a synonym is left out
    assert len(added) == 3 * 5  # every context, with the empty slot and each word
    neighbours, = (s.neighbours for s in concept_shares(_config(unrelated_words=4))[0])
    assert neighbours == ("green circle",)  # kept, but never where the concept goes


def test_unrelated_words_hold_what_the_concepts_move_would_drag(backend):
    """Prompts with an ordinary word in the slot move less when those words are kept."""
    probe = [p.format(w) for p in CONTEXTS for w in ("bottle", "rabbit", "")]
    with torch.no_grad():
        frozen = encode(backend, probe)

    def drift(**settings) -> float:
        result = erase(backend, _config(steps=120, lr=1e-2, lora=LoraConfig(preset="all"), **settings))
        with torch.no_grad(), result.deltas.inject(backend.linear):
            return float((encode(backend, probe) - frozen).norm() / frozen.norm())

    assert drift(unrelated_words=len(ORDINARY_WORDS)) < 0.7 * drift()  # measured: 0.06 against 0.16
