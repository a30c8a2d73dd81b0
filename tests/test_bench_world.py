"""The benchmark world: labels match pixels, the classifier reads them, the harness runs."""
import random
from pathlib import Path

import numpy as np
import pytest

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
