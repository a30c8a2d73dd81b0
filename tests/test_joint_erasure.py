"""Joint erasure of a list of concepts in one run (issue 13 item 3; the contextual method), on tiny models."""
import dataclasses
import json
import sys

import pytest
import torch
from safetensors import safe_open

from unlearn_core import objectives
from unlearn_core.cli import build_parser, erase_config_from_args, main
from unlearn_core.config import Concept, EraseConfig, LoraConfig
from unlearn_core.contexts import build_contexts, fill, keep_prompts
from unlearn_core.erase import concept_shares, erase, joint_prompts, mentions
from unlearn_core.methods import method_config
from unlearn_core.prompts import OBJECT_TEMPLATES, STYLE_TEMPLATES
from unlearn_core.tokens import encode

CONTEXTS = ("a {} on a table", "a big {} in a room", "a small {} on grass")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_joint_erasure_moves_every_concept_to_its_target_and_keeps_a_neighbour_and_the_empty_prompt(backend):
    config = EraseConfig(concept="red square", also=("blue triangle",), method="contextual", contexts=CONTEXTS,
                         keep=("green circle",), steps=150, lr=1e-2, max_contexts=8, lora=LoraConfig(preset="all"))
    result = erase(backend, config)
    assert result.unet_calls == 0 and any("2 concepts erased jointly" in note for note in result.notes)
    neighbour = "a green circle on a table"
    prompts = ["a red square on a table", "a blue triangle on a table"]
    with torch.no_grad():
        frozen_keep, frozen_empty = encode(backend, [neighbour]), encode(backend, [""])
        frozen = [encode(backend, [p]) for p in prompts]
        with result.deltas.inject(backend.linear):
            erased = [encode(backend, [p]) for p in prompts]
            kept, empty = encode(backend, [neighbour]), encode(backend, [""])
    moved = []
    for before, after in zip(frozen, erased):
        # no anchor named: in each context a concept becomes its neighbours' average (here the one neighbour)
        target = objectives.negative_target(frozen_keep, before, config.negative_guidance)
        assert _relative(after, target) < 0.6 * _relative(before, target)  # each concept moved well towards it
        moved.append(_relative(after, before))
    assert _relative(kept, frozen_keep) < 0.25 * min(moved)  # the neighbour barely moved
    assert _relative(empty, frozen_empty) < 0.1 * min(moved)  # the empty prompt held


def test_a_single_concept_run_erases_and_keeps_exactly_the_prompts_it_did_before_joint_erasure(backend, monkeypatch):
    """Without ``also`` a run is built as before joint erasure existed: the concept and its synonyms in every
    context (no context, neighbour or keep prompt left out) and the contexts with the neighbour kept. Checked on
    the prompts themselves (deterministic on any CPU), not on trained numbers."""
    erase_module = sys.modules[erase.__module__]  # the package exports the function under the module's name
    built = []
    real_pairs = erase_module.erase_pairs
    monkeypatch.setattr(erase_module, "erase_pairs",
                        lambda contexts, subjects, anchor: built.append((list(contexts), list(subjects), anchor))
                        or real_pairs(contexts, subjects, anchor))
    config = EraseConfig(concept="red square", synonyms=("crimson square",), method="contextual",
                         contexts=CONTEXTS[:2], keep=("green circle",), steps=2, lr=1e-2, max_contexts=6,
                         lora=LoraConfig(preset="all"))
    result = erase(backend, config)
    contexts = build_contexts(config.contexts, config.kind, config.max_contexts, config.seed)
    assert contexts[:2] == list(CONTEXTS[:2]) and len(contexts) == 6
    assert built == [(contexts, ["red square", "crimson square"], "")]
    keep = keep_prompts(contexts, config.keep, config.preserve)
    assert keep[:6] == [fill(c, "green circle") for c in contexts]
    assert f"erased in 6 contexts (12 prompts), kept {len(keep)} prompts and the empty one" in result.notes
    assert not any("left out" in note or "jointly" in note for note in result.notes)
    info = result.info()
    assert info["concept"] == config.concept and info["synonyms"] == list(config.synonyms)
    assert "concepts" not in info


def test_joint_prompts_leave_out_what_names_a_concept():
    config = EraseConfig(concept="a cat", also=(("a dog", ("a puppy",)),), method="contextual",
                         keep=("a bird", "a dog toy"), preserve=("a photo", "a puppy on a sofa"))
    contexts = ["{} on a sofa", "{} next to a puppy", "{} in a catalogue"]
    keep = ["a bird on a sofa", "a bird next to a puppy", "a photo", "a puppy on a sofa"]
    kept_contexts, kept, neighbours, notes = joint_prompts(config, contexts, keep)
    assert kept_contexts == ["{} on a sofa", "{} in a catalogue"]  # "a cat" is not in "a catalogue"
    assert kept == ["a bird on a sofa", "a photo"] and neighbours == ("a bird",)
    assert len(notes) == 3 and "1 context(s)" in notes[0]
    assert mentions("A  Dog, running", ["a dog"]) and not mentions("a doggy", ["a dog"])
    with pytest.raises(ValueError, match="contexts: every context names"):
        joint_prompts(config, ["{} next to a cat"], keep)
    with pytest.raises(ValueError, match="anchor: 'a small dog' names a concept"):
        joint_prompts(EraseConfig(concept="a cat", also=("dog",), method="contextual", anchor="a small dog"),
                      contexts, keep)


def test_concepts_and_metadata_record_the_whole_list(backend):
    config = EraseConfig(concept="red square", synonyms=("crimson square",),
                         also=(Concept("blue triangle", ("navy triangle",)), "green star"), method="contextual",
                         contexts=CONTEXTS, steps=2, max_contexts=3)
    assert [c.name for c in config.concepts] == ["red square", "blue triangle", "green star"]
    assert config.concept_label == "red square, blue triangle, green star"
    result = erase(backend, config)
    assert any("(15 prompts)" in note for note in result.notes)  # 3 contexts x (2 + 2 + 1 phrasings)
    info = result.info()
    assert info["concept"] == "red square, blue triangle, green star"
    assert info["concepts"] == ["red square", "blue triangle", "green star"]
    assert info["synonyms"] == ["crimson square", "navy triangle"]
    assert info["concept_synonyms"] == {"red square": ["crimson square"], "blue triangle": ["navy triangle"],
                                        "green star": []}


@pytest.mark.parametrize("settings, field, message", [
    (dict(also=("Red  Square",)), "also", "'Red  Square' is named twice in the list of concepts"),
    (dict(also=("blue circle", "blue circle")), "also", "'blue circle' is named twice"),
    (dict(also=(("blue circle", ("crimson square",)),)), "also",
     "'crimson square' is given for both 'red square' and 'blue circle'"),
    (dict(also=("blue circle=navy disc",)), None, None),  # the config takes names as they are: no parsing there
    (dict(also=(" ",)), "also", "contains a concept with an empty name"),
    (dict(also=(("blue circle", ("",)),)), "also", "synonyms of 'blue circle' contain an empty entry"),
    (dict(also=("blue circle",), keep=("Blue Circle",)), "keep", "'Blue Circle' is one of the phrasings to erase"),
    (dict(keep=("crimson square",)), "keep", "of 'red square'"),
    (dict(also=("blue circle",), anchor="blue circle"), "anchor", "is a concept to erase"),
    (dict(also=("blue circle",), method="anchor"), "also", "option of the contextual method, not 'anchor'"),
    (dict(also=("blue circle",), method="weighted"), "also", "erase each concept on its own and stack"),
    (dict(also=("blue circle",), adversarial_rounds=1), "also", "robust option"),
    (dict(also="blue circle"), "also", "give a list of concepts, not a single one"),
    (dict(also=(("blue circle", "navy disc"),)), "synonyms", "give a list of phrases, not one string"),
    (dict(also=(3,)), "also", "each entry is a concept name"),
    # a concept's own contexts, keep and kind (here as a JSON file gives them)
    (dict(also=({"name": "blue circle", "contexts": ["a cube"]},)), "contexts of 'blue circle'",
     "each context needs one '{}'"),
    (dict(also=({"name": "blue circle", "contexts": ["a {} and a {}"]},)), "contexts of 'blue circle'", "needs one"),
    (dict(also=({"name": "blue circle", "contexts": "a {}"},)), "contexts of 'blue circle'", "not one string"),
    (dict(also=({"name": "blue circle", "keep": ["navy", 3]},)), "keep of 'blue circle'", "give a list of phrases"),
    (dict(also=({"name": "blue circle", "keep": [" "]},)), "keep of 'blue circle'", "contains an empty entry"),
    (dict(also=({"name": "blue circle", "keep": ["Crimson Square"]},)), "keep of 'blue circle'",
     "'Crimson Square' is one of the phrasings to erase (of 'red square')"),
    (dict(also=({"name": "blue circle", "kind": "colour"},)), "kind of 'blue circle'", "must be 'object' or 'style'"),
    (dict(also=({"name": "blue circle", "neighbours": ["navy"]},)), "also", "a mapping of name, synonyms, contexts"),
    (dict(also=({"synonyms": ["navy"]},)), "also", "a mapping of name"),
])
def test_bad_lists_of_concepts_are_clear_errors(settings, field, message):
    settings = dict(method="contextual", synonyms=("crimson square",)) | settings
    if message is None:
        assert EraseConfig(concept="red square", **settings).also == (Concept("blue circle=navy disc"),)
        return
    with pytest.raises(ValueError) as error:
        EraseConfig(concept="red square", **settings)
    assert str(error.value).startswith(f"{field}") and message in str(error.value), str(error.value)


def test_a_concept_given_as_a_mapping_keeps_its_own_fields_and_takes_the_configs_for_the_rest():
    config = EraseConfig(concept="square", method="contextual", contexts=("a red {}",), keep=("circle",),
                         also=({"name": "green", "synonyms": ["lime"], "contexts": ["a {} cube"], "keep": []},))
    assert config.also == (Concept("green", ("lime",), ("a {} cube",), ()),)  # no neighbours: () is not None
    square, green = config.concepts
    assert (square.contexts, square.keep, square.kind) == (("a red {}",), ("circle",), "object")
    assert (green.contexts, green.keep, green.kind) == (("a {} cube",), (), "object")
    assert hash(config)  # tuples throughout: a config stays a dict key (bench caches erasures by config)


def test_method_table_passes_the_list_on_and_refuses_it_for_other_methods():
    config = method_config("contextual", "a cat", also=("a dog",), steps=None)
    assert [c.name for c in config.concepts] == ["a cat", "a dog"] and config.steps == 200
    for method in ("weighted", "anchor", "fewshot", "fewshot-paper"):
        with pytest.raises(ValueError, match="also: erasing several concepts in one run is an option of the"):
            method_config(method, "a cat", also=("a dog",))


def _errors(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("concepts, message", [
    (["a cat", "A Cat"], "--concept: 'A Cat' is named twice in the list of concepts"),
    (["a cat=a kitten", "a dog=a kitten"], "--concept: 'a kitten' is given for both 'a cat' and 'a dog'"),
    (["a cat", "=a dog"], "--concept: contains a concept with an empty name"),
    (["a cat", "a dog=a puppy|"], "--concept: synonyms of 'a dog' contain an empty entry"),
])
def test_cli_checks_the_list_before_the_model_loads(capsys, tmp_path, concepts, message):
    argv = ["erase", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "a.safetensors")]
    for concept in concepts:
        argv += ["--concept", concept]
    assert main(argv) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and message in errors[0], errors  # not the missing model: that would load later


def test_cli_refuses_a_list_for_other_methods_before_the_model_loads(capsys, tmp_path):
    assert main(["erase", "--model", str(tmp_path / "no-model"), "--concept", "a cat", "--concept", "a dog",
                 "--method", "anchor", "--out", str(tmp_path / "a.safetensors")]) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and "--concept: erasing several concepts in one run is an option of the contextual" \
        in errors[0], errors


def test_cli_help_explains_the_list():
    erase_parser = build_parser()._subparsers._group_actions[0].choices["erase"]
    text = " ".join(erase_parser.format_help().split())
    assert "repeat it to erase several concepts jointly" in text and "'a dog=a puppy|a hound'" in text
    assert "--concept-file JSON more concepts to erase jointly with --concept (contextual), each with its own " \
           "captions, neighbours and kind" in text and '"contexts": ["a {} cube on dots"]' in text


def test_cli_erases_a_list_and_the_file_records_it(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "joint.safetensors"
    assert main(["erase", "--model", str(tiny_model_dir), "--concept", "a red square", "--synonym", "a crimson box",
                 "--concept", "a blue circle=a navy disc|a blue ring", "--steps", "2", "--out", str(out)]) == 0
    assert "2 concepts erased jointly: a red square, a blue circle" in capsys.readouterr().err
    with safe_open(str(out), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["concept_unlearn.concept"] == "a red square, a blue circle"
    assert json.loads(metadata["concept_unlearn.concepts"]) == ["a red square", "a blue circle"]
    assert json.loads(metadata["concept_unlearn.concept_synonyms"]) == {
        "a red square": ["a crimson box"], "a blue circle": ["a navy disc", "a blue ring"]}


# a shape and a colour erased together, each with its own captions and neighbours (issue 13 item 3): the colour's
# captions slot a colour ("a {} cube"), the shape's a shape ("a red {}"); each names the other once, to be left out
SHAPE_CONTEXTS = ("a red {} on dots", "a blue {} in a room", "a green {} on grass")
COLOUR_CONTEXTS = ("a {} cube on dots", "a {} ball in a room", "a {} square on grass")


def _shape_and_colour(shape_keep=("circle", "triangle"), colour_keep=("yellow", "purple", "green circle"),
                      **settings) -> EraseConfig:
    colour = Concept("green", ("lime",), contexts=COLOUR_CONTEXTS, keep=colour_keep)
    return EraseConfig(concept="square", synonyms=("box",), also=(colour,), method="contextual",
                       contexts=SHAPE_CONTEXTS, keep=shape_keep, max_contexts=4, lora=LoraConfig(preset="all"),
                       **settings)


def test_each_concept_has_its_own_contexts_neighbours_and_kind_and_the_keep_prompts_are_their_union():
    style = Concept("watercolour", kind="style")  # gives only its kind: the config's captions and neighbours
    config = _shape_and_colour(steps=1)
    config = dataclasses.replace(config, also=(*config.also, style), max_contexts=8)
    square, green, watercolour = config.concepts
    assert (square.contexts, square.keep, square.kind) == (SHAPE_CONTEXTS, ("circle", "triangle"), "object")
    assert (green.contexts, green.keep, green.kind) == (COLOUR_CONTEXTS, ("yellow", "purple", "green circle"),
                                                        "object")
    assert (watercolour.contexts, watercolour.keep, watercolour.kind) == (SHAPE_CONTEXTS, square.keep, "style")
    shares, keep, notes = concept_shares(config)
    assert [s.concept for s in shares] == list(config.concepts)
    for share, kind, named in zip(shares, ("object", "object", "style"), ("green", "square", "green")):
        built = build_contexts(share.concept.contexts, kind, 8, config.seed)
        # its own contexts, but those naming another erased concept outside the slot
        assert share.contexts == [c for c in built if named not in c] and len(share.contexts) < len(built)
    assert "a {} cube on dots" in shares[1].contexts and "a {} cube on dots" not in shares[0].contexts
    style_only, object_only = set(STYLE_TEMPLATES) - set(OBJECT_TEMPLATES), set(OBJECT_TEMPLATES) - set(
        STYLE_TEMPLATES)
    assert set(shares[2].contexts) & style_only and not set(shares[2].contexts) & object_only  # its own kind
    assert set(shares[0].contexts) & object_only and not set(shares[0].contexts) & style_only
    assert shares[1].neighbours == ("yellow", "purple")  # "green circle" names green
    expected = {fill(c, k) for s in shares for c in s.contexts for k in s.neighbours}
    assert set(keep) == expected | {p for p in config.preserve if p} and len(keep) == len(set(keep))
    assert "a circle on dots" not in keep and "a yellow cube on dots" in keep and "a red circle on dots" in keep
    # distinct contexts over the concepts: square's (and watercolour's) "a green {} on grass" and its cross-over
    # "a green {} in a room", green's "a {} square on grass"
    assert notes[:2] == ["3 context(s) naming one of the concepts left out",
                         "1 neighbour(s) naming one of the concepts left out"]
    assert len(notes) == 3 and "keep/preserve prompt(s)" in notes[2]


def test_a_joint_run_builds_each_concepts_prompts_and_target_from_its_own_contexts_and_neighbours(backend,
                                                                                                 monkeypatch):
    erase_module = sys.modules[erase.__module__]
    built, targets = [], []
    real_pairs, real_target = erase_module.erase_pairs, objectives.negative_target
    monkeypatch.setattr(erase_module, "erase_pairs",
                        lambda contexts, subjects, anchor: built.append((list(contexts), list(subjects), anchor))
                        or real_pairs(contexts, subjects, anchor))
    monkeypatch.setattr(objectives, "negative_target",
                        lambda anchor, concept, guidance: targets.append(anchor) or real_target(anchor, concept,
                                                                                                  guidance))
    config = _shape_and_colour(steps=2, lr=1e-2)
    result = erase(backend, config)
    shares, keep, _ = concept_shares(config)
    assert built == [(shares[0].contexts, ["square", "box"], ""), (shares[1].contexts, ["green", "lime"], "")]
    assert not {"a {} cube on dots", "a {} ball in a room"} & set(shares[0].contexts)
    assert not {"a red {} on dots", "a blue {} in a room"} & set(shares[1].contexts)
    with torch.no_grad():
        def neighbours_mean(share, neighbours):  # per erase prompt: its context's neighbours' average
            return torch.stack([encode(backend, [fill(c, k) for k in neighbours]).mean(0)
                                for c in share.contexts]).repeat_interleave(2, dim=0)

        for share, other, anchor in zip(shares, reversed(shares), targets):
            own = neighbours_mean(share, share.neighbours)
            assert torch.allclose(anchor, own, atol=1e-5)  # its target: its own neighbours' mean
            assert not torch.allclose(anchor, neighbours_mean(share, other.neighbours), atol=1e-3)
    contexts = set(shares[0].contexts) | set(shares[1].contexts)
    assert f"erased in {len(contexts)} contexts ({2 * len(contexts)} prompts), kept {len(keep)} prompts and the " \
           "empty one" in result.notes  # each context is one concept's, with two phrasings
    info = result.info()
    assert info["concepts"] == ["square", "green"] and info["concept"] == "square, green"


def test_a_trained_joint_run_moves_each_concept_towards_its_own_neighbours_not_the_others(backend):
    """One neighbour each, so the two targets differ: in every context of its own, a concept ends nearer its own
    neighbour than the other concept's (the square starts nearer the colour's), having moved towards its own more."""
    config = _shape_and_colour(("circle",), ("yellow",), steps=150, lr=1e-2, negative_guidance=0.0)
    result = erase(backend, config)
    shares, _, _ = concept_shares(config)
    with torch.no_grad():
        for share, other in zip(shares, reversed(shares)):
            for context in share.contexts:
                before = encode(backend, [fill(context, share.concept.name)])
                with result.deltas.inject(backend.linear):
                    after = encode(backend, [fill(context, share.concept.name)])
                # negative guidance 0: the target is the neighbour in the same context
                own, others = (encode(backend, [fill(context, s.neighbours[0])]) for s in (share, other))
                towards_own = _relative(before, own) - _relative(after, own)
                towards_other = _relative(before, others) - _relative(after, others)
                assert _relative(after, own) < 0.8 * _relative(before, own), context
                assert towards_own > 2 * towards_other, context
                assert _relative(after, own) < 0.75 * _relative(after, others), context


def test_cli_concept_file_gives_each_concept_its_own_contexts_neighbours_and_kind(capsys, tiny_model_dir, tmp_path):
    concepts = tmp_path / "concepts.json"
    concepts.write_text(json.dumps([{"name": "green", "synonyms": ["lime"], "contexts": list(COLOUR_CONTEXTS),
                                     "keep": ["yellow"]}, {"name": "on stripes", "kind": "style"}]))
    out = tmp_path / "joint.safetensors"
    argv = ["erase", "--model", str(tiny_model_dir), "--concept", "square", "--context", "a red {} on dots",
            "--keep", "circle", "--concept-file", str(concepts), "--steps", "2", "--out", str(out)]
    square, green, stripes = erase_config_from_args(build_parser().parse_args(argv)).concepts
    assert (square.contexts, square.keep, square.kind) == (("a red {} on dots",), ("circle",), "object")
    assert (green.synonyms, green.contexts, green.keep, green.kind) == (("lime",), COLOUR_CONTEXTS, ("yellow",),
                                                                       "object")
    assert (stripes.contexts, stripes.keep, stripes.kind) == (square.contexts, square.keep, "style")
    assert main(argv) == 0
    assert "3 concepts erased jointly: square, green, on stripes" in capsys.readouterr().err
    with safe_open(str(out), "pt") as handle:
        assert json.loads(handle.metadata()["concept_unlearn.concepts"]) == ["square", "green", "on stripes"]


@pytest.mark.parametrize("text, message", [
    (None, "cannot read it"),
    ("[{'name': 'green'}]", "not a JSON file"),
    ('{"name": "green"}', "give a JSON list of concepts, e.g. [{\"name\": \"green\""),
    ("[]", "give a JSON list of concepts"),
    ('[{"name": "green", "colour": "green"}]', "each entry is a concept name"),
    ('[{"name": "green", "contexts": ["a cube"]}]', "contexts of 'green': each context needs one '{}'"),
])
def test_cli_refuses_a_bad_concept_file_before_the_model_loads(capsys, tmp_path, text, message):
    concepts = tmp_path / "concepts.json"
    if text is not None:
        concepts.write_text(text)
    assert main(["erase", "--model", str(tmp_path / "no-model"), "--concept", "square", "--concept-file",
                 str(concepts), "--out", str(tmp_path / "a.safetensors")]) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and f"--concept-file {concepts}: {message}" in errors[0], errors


def test_cli_names_both_options_when_the_file_repeats_a_concept(capsys, tmp_path):
    concepts = tmp_path / "concepts.json"
    concepts.write_text('[{"name": "Square"}]')
    assert main(["erase", "--model", str(tmp_path / "no-model"), "--concept", "square", "--concept-file",
                 str(concepts), "--out", str(tmp_path / "a.safetensors")]) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and "--concept/--concept-file: 'Square' is named twice" in errors[0], errors
