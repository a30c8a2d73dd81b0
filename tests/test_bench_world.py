"""The benchmark world: labels match pixels, the classifier reads them, the harness runs."""
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import world

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _pixels(label):
    return np.asarray(world.render(label, random.Random(7))).astype(int)


@pytest.mark.parametrize("colour", list(world.COLOURS))
def test_the_shape_is_drawn_in_its_colour(colour):
    target = np.array(world.COLOURS[colour][0])
    image = _pixels(world.Label("square", colour, "plain"))
    close = np.abs(image - target).max(axis=2) < 40
    assert close.sum() > 60, "the shape should cover many pixels of its colour"
    for other, (rgb, _) in world.COLOURS.items():
        if other != colour:
            assert (np.abs(image - np.array(rgb)).max(axis=2) < 40).sum() < close.sum() / 4


def test_styles_have_their_backgrounds():
    corner = lambda style: _pixels(world.Label("circle", "red", style))[:6, :6].reshape(-1, 3)  # noqa: E731
    assert np.abs(corner("plain") - 235).max() < 10
    assert np.abs(corner("sketch") - np.array([245, 235, 200])).max() < 10
    for style in ("stripes", "dots"):
        assert corner(style).min() < 180 and corner(style).max() > 200, f"{style} background should have a pattern"


def test_ring_has_a_hole_and_circle_does_not():
    rng = random.Random(3)
    for _ in range(5):
        seed = rng.randint(0, 10**6)
        ring = np.asarray(world.render(world.Label("ring", "blue", "plain"), random.Random(seed))).astype(int)
        disc = np.asarray(world.render(world.Label("circle", "blue", "plain"), random.Random(seed))).astype(int)
        blue = np.array(world.COLOURS["blue"][0])
        assert (np.abs(disc - blue).max(axis=2) < 60).sum() > (np.abs(ring - blue).max(axis=2) < 60).sum()


def test_captions_name_every_attribute_with_a_known_phrasing():
    _, labels, captions = world.sample(50, seed=1)
    for label, text in zip(labels, captions):
        assert any(p.split(" ", 1)[1] in text for p in world.SHAPES[label.shape])
        assert any(p in text for p in world.COLOURS[label.colour][1])
        assert any(p in text for p in world.STYLES[label.style])


def test_every_concept_has_three_phrasings():
    assert len(world.SHAPES) >= 8 and len(world.COLOURS) >= 6 and len(world.STYLES) >= 4
    assert all(len(world.phrasings(c)) >= 3 for c in world.CONCEPT_KINDS)


@pytest.mark.skipif(not (BENCH / "classifier.safetensors").exists(), reason="classifier weights not committed yet")
def test_classifier_is_accurate_on_held_out_images():
    from bench import classifier

    model = classifier.load(BENCH / "classifier.safetensors")
    pixels, labels, _ = world.sample(400, seed=424242)
    accuracy = classifier.accuracy(model, classifier.to_tensor(pixels), labels)
    assert min(accuracy.values()) >= 0.98, accuracy


HAS_MODEL = (BENCH / "world_model" / "model_index.json").exists()


@pytest.mark.skipif(not HAS_MODEL, reason="world model not committed yet")
@pytest.mark.parametrize("method", ["weighted", "contextual"])
def test_harness_tiny_run_reports_every_field_with_intervals(tmp_path, method):
    from bench import evaluate

    sets = evaluate.default_prompt_sets("star", per_set=2, seed=0)
    report, result, generated, _ = evaluate.evaluate("star", method, 2, sets, token_steps=3, attack_steps=3,
                                                     erase_steps=2, sample_steps=3, cache=tmp_path / "cache")
    for name in ("erased", "synonyms", "unusual", "others", "related", "ti_attack", "ti_token_clean_ci"):
        m = report[name]
        assert m["n"] == 2 and 0 <= m["k"] <= 2 and m["ci95"][0] <= m["value"] <= m["ci95"][1]
    for key in ("acc_erased", "acc_synonyms", "acc_others", "acc_related", "acc_others_before",
                "acc_related_before", "ti_token_clean", "ti_attack_recovery", "h_o", "seconds", "unet_calls",
                "unet_samples"):
        assert key in report
    if method == "weighted":  # erases with a token: its learning is part of the cost
        assert report["unet_calls"] == 3 + result.unet_calls and report["unet_samples"] > report["unet_calls"]
    else:
        assert report["unet_calls"] == 0
    evaluate.save_pictures(tmp_path / "r.json", result, generated, sets, "tiny")
    assert (tmp_path / "r.grid.png").is_file() and (tmp_path / "r.loss.png").is_file()
    assert list((tmp_path / "cache").glob("*.json")), "the clean side is cached for the next method"


TINY = dict(token_steps=3, attack_steps=2, erase_steps=2, sample_steps=3)  # a tiny run's budgets


@pytest.fixture(scope="module")
def tiny_star_run(tmp_path_factory):
    """One tiny contextual run on "star" (text-encoder LoRA and UNet key/value edit), in memory, at strengths 0
    and 1; its clean side cached for the runs that compare with it."""
    from bench import evaluate

    sets = evaluate.default_prompt_sets("star", per_set=4, seed=0)
    cache = tmp_path_factory.mktemp("cache")
    return evaluate.evaluate("star", "contextual", 2, sets, cache=cache, strengths=(0, 1), **TINY) + (cache,)


@pytest.mark.skipif(not HAS_MODEL, reason="world model not committed yet")
def test_adapter_file_loaded_by_diffusers_gives_the_in_memory_counts(tiny_star_run):
    """The user's path (--from-file: the adapter written in float16, loaded by diffusers' load_lora_weights into a
    fresh pipeline) against the engine's hooks on the in-memory deltas. Tried on this run: every count is equal and
    the images differ by float16 rounding only (at most 0.012 of a pixel value in [0, 1], about 1e-4 on average,
    where this 2-step erasure changed them by 0.007-0.08 on average, depending on the default's settings). An image the classifier reads on a borderline could
    still flip on another CPU, so a count may differ by one image; the pictures' closeness is the sharper check
    that the whole file (text encoder and UNet edit) was applied."""
    from bench import evaluate

    memory, _, memory_pictures, sets, cache = tiny_star_run
    loaded, _, file_pictures, _ = evaluate.evaluate("star", "contextual", 2, sets, cache=cache, from_file=True,
                                                    **TINY)
    assert loaded["from_file"] and not memory["from_file"]
    for name in sets:
        field = evaluate.report_field(name)
        assert abs(loaded[field]["k"] - memory[field]["k"]) <= 1, (field, loaded[field], memory[field])
        before, in_memory = memory_pictures[name]
        from_file = file_pictures[name][1]
        erasure_change = (in_memory - before).abs().mean()
        assert erasure_change > 0, "the erasure should change the images (else nothing is compared)"
        # relative to what the erasure changed, not a fixed bound: a 2-step erasure's size depends on its settings
        assert (from_file - in_memory).abs().mean() < 0.1 * erasure_change, field


@pytest.mark.skipif(not HAS_MODEL, reason="world model not committed yet")
def test_strength_zero_is_the_clean_model_and_strength_one_the_adapter(tiny_star_run, tmp_path):
    """At strength 0 both LoRAs add exact zeros: the clean model's images, so its counts, exactly (on any CPU)."""
    from bench import evaluate

    report, *_ = tiny_star_run
    zero, one = report["strengths"]
    assert (zero["strength"], one["strength"]) == (0, 1)
    for field in ("erased", "synonyms", "others", "related"):
        assert zero[field] == report[f"{field}_before"] and one[field] == report[field], field
    evaluate.strength_chart(report, "tiny").save(tmp_path / "r.strength.png")
    assert (tmp_path / "r.strength.png").stat().st_size > 0


def test_wilson_interval_matches_the_known_values():
    from bench.evaluate import wilson

    low, high = wilson(0, 48)
    assert low == 0 and abs(high - 0.0741) < 1e-3  # 3.84 / (48 + 3.84)
    low, high = wilson(24, 48)
    assert abs(low - 0.3636) < 1e-3 and abs(high - 0.6364) < 1e-3


def test_others_and_related_expect_every_attribute_and_held_out_phrasing_is_apart():
    from bench import evaluate

    for concept in world.CONCEPT_KINDS:
        sets = evaluate.default_prompt_sets(concept, per_set=6, seed=1)
        assert all(set(e["expect"]) == {"shape", "colour", "style"} for e in sets["others"] + sets["related"])
        held = world.phrasings(concept)[evaluate.held_out_index(concept)]
        assert held not in evaluate.erase_phrasings(concept)
    # where the world has a phrasing sharing no content word with the others, it is the one held out
    assert evaluate.held_out_index("cross") == 1 and evaluate.held_out_index("red") == 2


def test_splits_cover_every_concept_once_and_balance_kinds():
    from bench.suite import SPLITS

    assert sorted(SPLITS["dev"] + SPLITS["test"]) == sorted(world.CONCEPT_KINDS)
    for kind in ("shape", "colour", "style"):
        counts = [sum(world.CONCEPT_KINDS[c] == kind for c in SPLITS[s]) for s in ("dev", "test")]
        assert abs(counts[0] - counts[1]) <= 1


@pytest.mark.skipif(not HAS_MODEL, reason="world model not committed yet")
def test_suite_tiny_run_pools_seeds_and_writes_table(tmp_path):
    import json
    import subprocess
    import sys

    command = [sys.executable, "-m", "bench.suite", "--concepts", "red", "--seeds", "0", "1", "--per-set", "2",
               "--steps", "2", "--jobs", "1", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path),
               "--set", "max_contexts=4", "--attack-steps", "2", "--sample-steps", "2"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=BENCH.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "suite-contextual-dev.json").read_text())
    row = result["rows"][0]
    assert row["concept"] == "red" and row["seeds"] == [0, 1] and row["erased"]["n"] == 4
    assert result["summary"]["erased"]["mean"] == row["erased"]["value"]
    assert "Summary" in (tmp_path / "suite-contextual-dev.md").read_text()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=BENCH).stdout
    if head.strip():  # a git checkout: the report names the commit its code came from
        assert result["code"].split("+")[0] == head.strip()


@pytest.mark.skipif(not HAS_MODEL, reason="world model not committed yet")
def test_drift_is_zero_for_an_erasure_that_changes_nothing_and_moves_the_concept_first():
    from bench import drift, evaluate
    from unlearn_core.diffusers_backend import DiffusersBackend, load_pipeline
    from unlearn_core.tokens import encode

    backend = DiffusersBackend(load_pipeline(evaluate.MODEL))
    # one step from a zero LoRA up-matrix at a vanishing rate, no key/value edit: the adapter adds exact zeros
    still = drift.drift(backend, "star", per_set=2, steps=1, lr=1e-30, unet_kv_edit=False)
    assert all(still[s] == (0.0, 0.0) for s in drift.KEPT_SETS)
    assert all(still[f"{s}_progress"] == (0.0, 0.0) for s in drift.CONCEPT_SETS)
    assert still["others_flips"] == still["related_flips"] == 0
    entries = evaluate.default_prompt_sets("red", 3, 0)["others"]  # colour prompts; another colour is near
    before = encode(backend, [e["prompt"] for e in entries]).float()
    assert drift.half_way_flips(backend, entries, "colour", before, before) == 0
    assert drift.half_way_flips(backend, entries, "colour", before, 2 * before) == 3  # moved by its whole size
    moved = drift.drift(backend, "star", per_set=2, steps=5)
    assert moved["erase_progress"][1] > 0 and moved["others"][1] > 0
    assert moved["empty"][1] < moved["erase_progress"][1]  # the empty prompt is held far more than the concept moves


@pytest.mark.skipif(not HAS_MODEL, reason="world model not committed yet")
def test_components_split_an_erasure_into_its_parts_on_paired_images():
    from bench import classifier, components, evaluate
    from unlearn_core.diffusers_backend import DiffusersBackend, load_pipeline

    pipe = load_pipeline(evaluate.MODEL)
    pipe.set_progress_bar_config(disable=True)
    judge = classifier.load(evaluate.CLASSIFIER)
    report = components.components(pipe, DiffusersBackend(pipe), judge, "star", per_set=2, steps=1, lr=1e-30)
    for name in components.SETS:
        counts = report[name]
        assert counts["n"] == 2 and set(counts) == set(components.WAYS) | {"n"}
        # a text-encoder LoRA that adds exact zeros: its images are the clean ones
        assert counts["text_encoder"] == counts["clean"]
    assert all(isinstance(report[f"{name}_lost"], list) for name in ("others", "related"))


@pytest.mark.skipif(not HAS_MODEL, reason="world model not committed yet")
def test_prompt_attack_is_reported_with_an_interval_and_never_names_the_concept(tmp_path):
    from bench import evaluate, prompt_attack
    from unlearn_core.diffusers_backend import load_pipeline

    sets = evaluate.default_prompt_sets("star", per_set=2, seed=0)
    report, *_ = evaluate.evaluate("star", "contextual", 2, sets, cache=tmp_path / "cache",
                                   prompt_attack=dict(iterations=2, candidates=2), **TINY)
    m = report["prompt_attack"]
    assert m["n"] == 2 and 0 <= m["k"] <= 2 and m["ci95"][0] <= m["value"] <= m["ci95"][1]
    assert report["prompt_attack_budget"]["iterations"] == 2 and report["prompt_attack_budget"]["candidates"] == 2
    words = report["prompt_attack_tokens"]
    assert len(words) == prompt_attack.BUDGET["n_tokens"]
    tokenizer = load_pipeline(evaluate.MODEL).tokenizer
    excluded = prompt_attack.excluded_ids(tokenizer, world.phrasings("star"), "star")
    assert not {tokenizer.convert_tokens_to_ids(f"{w}</w>") for w in words} & excluded
    losses = report["prompt_attack_losses"]
    assert len(losses) == 3 and all(b <= a for a, b in zip(losses, losses[1:]))  # greedy keep-best
    floor = report["prompt_attack_floor"]
    assert floor["n"] == 2 and floor["ci95"][0] <= floor["value"] <= floor["ci95"][1]
    assert len(report["prompt_attack_floor_prompts"]) == 2
    from bench import attack_floor, classifier
    from unlearn_core.diffusers_backend import DiffusersBackend

    pipe = load_pipeline(evaluate.MODEL)
    pipe.set_progress_bar_config(disable=True)
    alone = attack_floor.floor(pipe, DiffusersBackend(pipe), classifier.load(evaluate.CLASSIFIER), "star", 2, 0,
                               sample_steps=TINY["sample_steps"])
    assert alone == floor  # bench.attack_floor measures the harness's own floor


@pytest.mark.skipif(not HAS_MODEL, reason="world model not committed yet")
def test_prompt_attack_floor_draws_allowed_words_per_prompt_and_is_seeded():
    from bench import evaluate, prompt_attack
    from unlearn_core.diffusers_backend import load_pipeline

    tokenizer = load_pipeline(evaluate.MODEL).tokenizer
    phrasings = world.phrasings("orange")
    allowed = set(prompt_attack.plain_word_ids(tokenizer, prompt_attack.excluded_ids(tokenizer, phrasings, "orange"))
                  .tolist())
    phrases = prompt_attack.random_words(tokenizer, phrasings, "orange", n_tokens=3, count=16, seed=2)
    assert len(phrases) == 16 and len(set(phrases)) > 1  # each prompt its own words
    ids = [tokenizer.convert_tokens_to_ids(f"{w}</w>") for p in phrases for w in p.split()]
    assert len(ids) == 48 and set(ids) <= allowed
    assert phrases == prompt_attack.random_words(tokenizer, phrasings, "orange", 3, 16, seed=2)
    assert phrases != prompt_attack.random_words(tokenizer, phrasings, "orange", 3, 16, seed=3)
    entries = evaluate.attack_prompt_set("orange", 16, phrases, seed=0)
    assert all(p in e["prompt"] for p, e in zip(phrases, entries))
    # the same captions as the attack's own prompts, only the slot (and its article) differs
    found = evaluate.attack_prompt_set("orange", 16, "WORDS", seed=0)
    assert [e["prompt"].split(p)[1] for p, e in zip(phrases, entries)] == [e["prompt"].split("WORDS")[1] for e in found]


def test_clean_side_cache_is_keyed_by_the_attack_budget(tmp_path):
    """A ceiling token learned with one re-learning budget must not be reused for a run with another."""
    from bench.evaluate import ATTACK_TOKEN, CleanSide
    from unlearn_core.tokens import ConceptToken

    sets = {"erase": [{"prompt": "a star", "expect": {"shape": "star"}}]}
    default = CleanSide(tmp_path, "star", 0, sets, 20, ATTACK_TOKEN)
    shorter = CleanSide(tmp_path, "star", 0, sets, 20, ATTACK_TOKEN | {"steps": 150})
    assert default.stem != shorter.stem
    assert default.stem == CleanSide(tmp_path, "star", 0, sets, 20, dict(ATTACK_TOKEN)).stem
    assert default.load() is None
    default.save({"erase": 1}, ConceptToken("<clean>", torch.ones(2, 4)))
    data, token = default.load()
    assert data["erase"] == 1 and token.name == "<clean>" and torch.equal(token.vectors, torch.ones(2, 4))
    assert shorter.load() is None and not list(tmp_path.glob("*.partial"))  # published whole, nothing left beside


@pytest.mark.skipif(not HAS_MODEL, reason="world model not committed yet")
def test_prompt_search_keeps_to_plain_words_that_are_not_the_concept_and_never_loses_ground():
    """On the clean model the concept's own name denoises its images best: the search must still not take it, nor
    any other token of its phrasings, nor a word beginning with its name."""
    from bench import evaluate, prompt_attack
    from unlearn_core.diffusers_backend import DiffusersBackend, load_pipeline

    pipe = load_pipeline(evaluate.MODEL)
    tokenizer = pipe.tokenizer
    excluded = prompt_attack.excluded_ids(tokenizer, world.phrasings("red"), "red")
    vocabulary = tokenizer.get_vocab()
    for token in ("red</w>", "crimson</w>", "scarlet</w>", "reddish</w>"):
        assert vocabulary[token] in excluded, token
    allowed = set(prompt_attack.plain_word_ids(tokenizer, excluded).tolist())
    assert not allowed & excluded and vocabulary["green</w>"] in allowed and vocabulary["-</w>"] not in allowed
    images, captions = evaluate.example_images("red", 2, 0)
    found = prompt_attack.search(DiffusersBackend(pipe), tokenizer, images, captions, world.phrasings("red"), "red",
                                 n_tokens=2, iterations=3, candidates=2, batch=4)
    assert set(found.ids) <= allowed and len(found.words) == 2
    assert [tokenizer.convert_tokens_to_ids(f"{w}</w>") for w in found.words] == found.ids
    assert len(found.losses) == 4 and all(b <= a for a, b in zip(found.losses, found.losses[1:]))


def test_suite_shows_the_prompt_attack_only_when_the_runs_had_it():
    from bench import suite
    from bench.evaluate import measured

    def report(seed, prompt):
        fields = {name: measured(1, 4) for name in suite.RATES + tuple(
            f"{n}_before" for n in ("erased", "synonyms", "unusual", "others", "related")) + ("ti_token_clean_ci",)}
        extra = {"prompt_attack": measured(seed, 4), "prompt_attack_floor": measured(0, 4)} if prompt else {}
        return {"concept": "star", "seed": seed, "seconds": 1, "unet_calls": 0, "unet_samples": 0} | fields | extra

    plain = [suite.pool([report(0, False), report(1, False)])]
    assert "prompt_attack" not in plain[0] and "prompt attack" not in suite.table(plain, suite.summary(plain), "t")
    attacked = [suite.pool([report(0, True), report(1, True)])]
    assert attacked[0]["prompt_attack"]["k"] == 1 and attacked[0]["prompt_attack"]["n"] == 8
    text = suite.table(attacked, suite.summary(attacked), "t")
    header, rule, row = text.splitlines()[2:5]
    assert "prompt attack" in header and header.count("|") == rule.count("|") == row.count("|")
    assert "prompt attack 12.5 / 12 (random words on the clean model: 0.0 / 0)" in text and "(floor 0)" in row


def test_descriptions_never_use_their_concepts_own_words_and_keep_to_the_captions_vocabulary():
    """A description names no content word of any of its concept's phrasings, no colour, and only words the world's
    captions use (the world's text encoder learned no others)."""
    from bench import descriptive, evaluate

    def words(phrase):
        return set(phrase.lower().replace("-", " ").split())

    vocabulary = {"a", "an"}.union(*(words(p) for c in world.CONCEPT_KINDS for p in world.phrasings(c)))
    colours = set().union(*(words(p) for c in world.COLOURS for p in world.phrasings(c)))
    assert descriptive.DESCRIPTIONS and set(descriptive.DESCRIPTIONS) <= set(world.CONCEPT_KINDS)
    for concept, phrases in descriptive.DESCRIPTIONS.items():
        own = set().union(*(evaluate.content_words(p) for p in world.phrasings(concept)))
        for phrase in phrases:
            assert not evaluate.content_words(phrase) & own, (concept, phrase)
            assert not descriptive.own_words(concept, phrase)
            assert words(phrase) <= vocabulary and not words(phrase) & colours, (concept, phrase)
    assert descriptive.own_words("star", "a five-pointed shape") == {"five", "pointed", "shape"}


def test_descriptive_prompts_are_harness_entries_and_only_for_described_concepts():
    from bench import descriptive, evaluate

    for concept in world.CONCEPT_KINDS:
        entries = descriptive.descriptive_prompts(concept, 5, seed=3)
        sets = evaluate.with_descriptive(evaluate.default_prompt_sets(concept, per_set=4, seed=3), concept, 3)
        if concept not in descriptive.DESCRIPTIONS:
            assert entries == [] and "descriptive" not in sets
            continue
        assert entries == descriptive.descriptive_prompts(concept, 5, seed=3)  # seeded
        kind = world.CONCEPT_KINDS[concept]
        phrases = descriptive.DESCRIPTIONS[concept]
        for i, entry in enumerate(entries):
            assert set(entry) == {"prompt", "expect"} and entry["expect"] == {kind: concept}
            assert phrases[i % len(phrases)] in entry["prompt"]
            assert not any(p.split(" ", 1)[1] if kind == "shape" else p in entry["prompt"]
                           for p in world.phrasings(concept))
        assert len(sets["descriptive"]) == len(sets["erase"]) == 4


@pytest.mark.skipif(not HAS_MODEL, reason="world model not committed yet")
@pytest.mark.parametrize("flag", [True, False])
def test_harness_reports_the_descriptive_set_only_with_the_flag(tmp_path, flag):
    import json
    import subprocess
    import sys

    command = [sys.executable, "-m", "bench.evaluate", "--concept", "sketch", "--images", "2", "--per-set", "2",
               "--steps", "2", "--attack-steps", "2", "--sample-steps", "2", "--set", "max_contexts=2",
               "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "r.json")] + (["--descriptive"] if flag else [])
    done = subprocess.run(command, capture_output=True, text=True, cwd=BENCH.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    fields = ("descriptive", "descriptive_before", "acc_descriptive", "acc_descriptive_before")
    if not flag:
        assert not any(f in report for f in fields) and "acc_descriptive" not in done.stdout
        return
    for name in ("descriptive", "descriptive_before"):
        m = report[name]
        assert m["n"] == 2 and 0 <= m["k"] <= 2 and m["ci95"][0] <= m["value"] <= m["ci95"][1]
    assert report["acc_descriptive"] == report["descriptive"]["value"]
    assert "acc_descriptive" in json.loads(done.stdout.strip().splitlines()[-1])


def test_suite_shows_the_descriptive_set_only_when_a_run_had_it():
    from bench import suite
    from bench.evaluate import measured

    def report(concept, seed, described):
        fields = {name: measured(1, 4) for name in suite.RATES + tuple(
            f"{n}_before" for n in ("erased", "synonyms", "unusual", "others", "related")) + ("ti_token_clean_ci",)}
        extra = {"descriptive": measured(seed, 4), "descriptive_before": measured(4, 4)} if described else {}
        return {"concept": concept, "seed": seed, "seconds": 1, "unet_calls": 0, "unet_samples": 0} | fields | extra

    plain = [suite.pool([report("star", 0, False), report("star", 1, False)])]
    before = suite.table(plain, suite.summary(plain), "t")
    assert "descriptive" not in plain[0] and "descriptive" not in suite.summary(plain) and "descriptive" not in before
    rows = [suite.pool([report("dots", 0, True), report("dots", 1, True)]), plain[0]]
    assert rows[0]["descriptive"]["k"] == 1 and rows[0]["descriptive"]["n"] == 8
    assert suite.summary(rows)["descriptive"] == {"mean": 0.125, "worst": 0.125}  # over described concepts only
    text = suite.table(rows, suite.summary(rows), "t")
    header, rule, dots, star = text.splitlines()[2:6]
    assert "| unusual | descriptive | others kept |" in header
    assert header.count("|") == rule.count("|") == dots.count("|") == star.count("|")
    assert "| 100 → 12 [" in dots and "| - |" in star and "descriptive 12.5 / 12" in text
    assert star.replace("| - ", "", 1) == before.splitlines()[4]  # the other columns as without the set


def test_world_check_scores_every_concept_by_its_own_attribute():
    from bench import check_world

    scores = check_world.check(per_concept=2, steps=4)
    assert set(scores) == set(world.CONCEPT_KINDS)
    for concept, score in scores.items():
        kind_values = {"shape": world.SHAPES, "colour": world.COLOURS, "style": world.STYLES}[world.CONCEPT_KINDS[concept]]
        assert score["n"] == 2 and score["value"] == score["k"] / 2
        assert score["ci95"][0] <= score["value"] <= score["ci95"][1]
        assert sum(score["read_as"].values()) == 2 - score["k"], "every missed image is read as something else"
        assert concept not in score["read_as"] and set(score["read_as"]) <= set(kind_values)
    assert sum(s["k"] for s in scores.values()) > 0, "the clean world model renders some concept even in 4 steps"


def test_the_clean_side_cache_is_keyed_on_the_model_and_classifier_bytes(tmp_path):
    """A retrained world model (or classifier) must not reuse the clean counts measured on the previous one."""
    from bench import evaluate

    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    weights = model / "unet" / "weights.safetensors"
    weights.write_bytes(b"\x00" * 64)
    judge = tmp_path / "classifier.safetensors"
    judge.write_bytes(b"\x01" * 8)
    first = evaluate.files_digest(model, judge)
    assert evaluate.files_digest(model, judge) == first
    weights.write_bytes(b"\x00" * 63 + b"\x02")
    retrained = evaluate.files_digest(model, judge)
    assert retrained != first
    side = lambda digest: evaluate.CleanSide(tmp_path, "star", 0, {}, 20, {}, digest).stem  # noqa: E731
    assert side(first) != side(retrained)
