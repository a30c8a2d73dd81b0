"""Where a concept goes without an anchor: the neighbours' average, or its most typical neighbour."""
import pytest
import torch

from unlearn_core.config import EraseConfig, LoraConfig
from unlearn_core.erase import erase
from unlearn_core.neighbours import (Spread, distances_to_concept, pairwise_distances, phrasings_of,
                                    pulled_onto_concept)
from unlearn_core.tokens import encode


def test_the_typical_neighbour_is_the_one_nearest_the_neighbours_average():
    neighbours = torch.tensor([[[0.5, 0.0]], [[-1.0, 0.0]], [[0.25, 3.0]], [[0.25, -3.0]]])  # [k, L=1, d=2], mean 0
    spread = Spread(len(neighbours))
    assert torch.allclose(spread.add(neighbours), torch.zeros(1, 2))
    assert spread.choice("typical") == 0 and spread.choice("mean") is None
    spread.add(torch.tensor([[[3.0, 0.0]], [[-0.1, 0.0]], [[0.25, 3.0]], [[0.25, -3.0]]]))  # a second context
    assert spread.choice("typical") == 1  # distances add up over the contexts: 0.5 + 2.15 against 1 + 0.95
    with pytest.raises(ValueError, match="neighbour_target"):
        spread.choice("farthest")


def test_distances_to_the_concept_are_averaged_over_the_contexts_and_a_pulled_word_is_under_half_its_clean_one(
        backend):
    contexts = ["a {} on a table", "a big {} in a room"]
    with torch.no_grad():
        d = distances_to_concept(lambda p: encode(backend, p), contexts, ("red square", "green circle"), "red square")
        one = [distances_to_concept(lambda p: encode(backend, p), [c], ("green circle",), "red square") for c in contexts]
    assert d[1] > 0 and d[0] <= 1e-5 * d[1]  # the same prompt twice in one batch: rows may differ by a rounding
    assert torch.allclose(d[1], (one[0] + one[1]) / 2)
    assert distances_to_concept(lambda p: encode(backend, p), contexts, (), "red square").numel() == 0
    assert pulled_onto_concept(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0.4, 0.5, 1.2])) == [True, False, False]


def test_the_nearest_neighbour_is_the_one_nearest_the_concept_over_the_contexts():
    neighbours = torch.tensor([[[0.5, 0.0]], [[-1.0, 0.0]], [[0.25, 3.0]]])  # [k, L=1, d=2]
    spread = Spread(len(neighbours))
    spread.add(neighbours, concept=torch.tensor([[0.0, 2.0]]))  # distances 2.06, 2.24, 1.03
    assert spread.choice("nearest") == 2
    spread.add(neighbours, concept=torch.tensor([[-1.0, -1.0]]))  # 1.80, 1.00, 4.27: totals 3.86, 3.24, 5.30
    assert spread.choice("nearest") == 1
    assert spread.choice("typical") == 0  # the average's own choice is unchanged by the concept


def test_typical_target_maps_the_concept_onto_one_kept_neighbour(backend):
    contexts = ("a {} on a table", "a big {} in a room")
    keep = ("green circle", "blue triangle")
    config = EraseConfig(concept="red square", method="contextual", contexts=contexts, keep=keep, neighbour_target="typical",
                         steps=80, lr=1e-2, max_contexts=2, negative_guidance=0.0, lora=LoraConfig(preset="all"))
    result = erase(backend, config)
    chosen = next(k for k in keep if any(f"{k!r}" in note for note in result.notes))
    with torch.no_grad():
        frozen, neighbour = encode(backend, ["a red square on a table"]), encode(backend, [f"a {chosen} on a table"])
        other = encode(backend, [f"a {next(k for k in keep if k != chosen)} on a table"])
        with result.deltas.inject(backend.linear):
            erased = encode(backend, ["a red square on a table"])
    # the concept went towards that neighbour's own conditioning, not towards the average of both
    assert (erased - neighbour).norm() < 0.6 * (frozen - neighbour).norm()
    assert (erased - neighbour).norm() < (erased - other).norm()


def test_a_word_far_nearer_an_erased_word_than_any_other_is_taken_for_its_phrasing(backend):
    words = ("red", "scarlet", "green", "orange")  # the last is the concept
    distances = torch.tensor([[0.0, 0.08, 0.85, 0.47], [0.08, 0.0, 0.83, 0.49], [0.85, 0.83, 0.0, 1.13],
                              [0.47, 0.49, 1.13, 0.0]], dtype=torch.float64)
    assert phrasings_of(distances, [True, False, False, False]) == [False, True, False, False]
    assert phrasings_of(distances, [False, False, False, False]) == [False] * 4  # nothing erased, nothing taken
    with torch.no_grad():
        measured = pairwise_distances(lambda p: encode(backend, p), ["a {} on a table", "a big {} in a room"], words)
    assert torch.equal(measured, measured.T) and torch.all(measured.diagonal() == 0)
    assert torch.all(measured[~torch.eye(4, dtype=torch.bool)] > 0)
