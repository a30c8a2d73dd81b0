"""The contextual method and the bounded objectives: each term's defining property, on small models."""
import pytest
import torch

from unlearn_core import objectives
from unlearn_core.config import EraseConfig, LoraConfig
from unlearn_core.contexts import build_contexts, crossovers, erase_pairs, keep_prompts
from unlearn_core.erase import erase
from unlearn_core.methods import METHODS, method_config
from unlearn_core.tokens import encode


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_hinge_ascent_stops_at_the_reference_loss():
    target = torch.zeros(4, 3)
    reference = torch.full((4, 3), 0.5)  # the frozen anchor's loss: 0.25 per sample
    below = torch.full((4, 3), 0.2, requires_grad=True)
    loss = objectives.bounded_ascent(below, target, reference)
    loss.backward()
    assert float(loss) > 0 and float(below.grad.abs().sum()) > 0  # pushed up while below the reference
    beyond = torch.full((4, 3), 0.9, requires_grad=True)
    loss = objectives.bounded_ascent(beyond, target, reference)
    loss.backward()
    assert float(loss) == 0 and float(beyond.grad.abs().sum()) == 0  # and never past it


def test_conditioning_term_is_zero_exactly_when_the_concept_is_the_anchor(backend):
    cond = encode(backend, ["a red square on a table"])
    scale = cond.pow(2).mean()
    same = objectives.negative_target(cond, cond, guidance=1.0)
    assert float(objectives.conditioning_match(cond, same, scale)) == 0
    other = encode(backend, ["a green circle on a table"])
    pushed = objectives.negative_target(other, cond, guidance=1.0)
    assert _relative(pushed - other, other - cond) < 1e-6  # as far past the anchor as the concept is before it


def test_contexts_cross_over_and_fill_every_subject_and_neighbour():
    contexts = ["a golden {} on dots", "a navy {} as a sketch"]
    assert "a golden {} as a sketch" in crossovers(contexts) and len(crossovers(contexts)) == 4
    built = build_contexts(tuple(contexts), "object", limit=6, seed=0)
    assert built[:2] == contexts and len(built) == 6 and all(c.count("{}") == 1 for c in built)
    pairs = erase_pairs(contexts, ["star", "<tok>"], "")
    assert ("a golden star on dots", "a golden on dots") in pairs and len(pairs) == 4
    keep = keep_prompts(contexts, ("circle",), ("a photo", ""))
    assert keep == ["a golden circle on dots", "a navy circle as a sketch", "a photo"]


def test_contextual_erasure_moves_the_concept_to_its_target_and_keeps_neighbours(backend):
    contexts = ("a {} on a table", "a big {} in a room", "a small {} on grass")
    config = EraseConfig(concept="red square", method="contextual", contexts=contexts, keep=("green circle",),
                         steps=150, lr=1e-2, max_contexts=8, lora=LoraConfig(preset="all"))
    result = erase(backend, config)
    assert result.unet_calls == 0 and result.unet_samples == 0
    prompt = "a red square on a table"
    with torch.no_grad():
        frozen_concept, frozen_keep = encode(backend, [prompt]), encode(backend, ["a green circle on a table"])
        # no anchor named: the concept becomes its neighbours' average in that context (here the one neighbour)
        target = objectives.negative_target(frozen_keep, frozen_concept, config.negative_guidance)
        frozen_empty = encode(backend, [""])
        with result.deltas.inject(backend.linear):
            erased, kept, empty = (encode(backend, [p]) for p in (prompt, "a green circle on a table", ""))
    assert _relative(erased, target) < 0.6 * _relative(frozen_concept, target)  # moved well towards it
    assert _relative(kept, frozen_keep) < 0.25 * _relative(erased, frozen_concept)  # neighbour barely moved
    assert _relative(empty, frozen_empty) < 0.1 * _relative(erased, frozen_concept)  # empty prompt held


def test_adversarial_rounds_learn_tokens_on_the_erased_model_and_erase_them(backend, images):
    config = EraseConfig(concept="red square", method="contextual", contexts=("a {} on a table",), steps=6,
                         adversarial_rounds=2, adversarial_steps=3, max_contexts=4)
    seen = []
    result = erase(backend, config, images, callback=lambda info: seen.append((info.step, info.total)))
    assert seen[-1] == (config.total_steps, config.total_steps) == (12, 12)  # one bar over every phase
    assert result.unet_calls == 2 * 3 and any("2 adversarial" in note for note in result.notes)
    with pytest.raises(ValueError, match="adversarial_rounds"):
        erase(backend, config)  # the attack tokens need the images


def test_method_table_is_what_every_host_builds_from():
    assert set(METHODS) == {"contextual", "weighted", "anchor", "fewshot", "fewshot-paper"}
    default = method_config("contextual", " a cat ", steps=None, keep=("a dog",))
    assert (default.concept, default.steps, default.anchor, default.keep) == ("a cat", 200, "", ("a dog",))
    assert default.neighbour_target == "nearest" and EraseConfig(concept="a cat").neighbour_target == "mean"
    paper = method_config("fewshot-paper", "a cat", steps=3, lr=1.0, rank=8)
    assert (paper.method, paper.steps, paper.lr, paper.lora.mode, paper.lora.compress_rank) == \
        ("fewshot", 10, 1e-5, "full", 8)
    assert method_config("weighted", "a cat").anchor == "a photo"
    robust = method_config("contextual", "a cat", adversarial_rounds=2)
    assert robust.needs_images and robust.total_steps == 200 + 2 * robust.adversarial_steps
    with pytest.raises(ValueError, match="method"):
        method_config("magic", "a cat")
