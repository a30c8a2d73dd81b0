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


@pytest.mark.skipif(not (BENCH / "world_model" / "model_index.json").exists(), reason="world model not committed yet")
def test_harness_tiny_run(tmp_path):
    from bench import evaluate

    sets = evaluate.default_prompt_sets("star", per_set=2, seed=0)
    report, result, generated, _ = evaluate.evaluate("star", "weighted", 2, sets, token_steps=3, erase_steps=2,
                                                     sample_steps=3)
    for key in ("acc_erased", "acc_synonyms", "acc_others", "acc_related", "acc_others_before",
                "acc_related_before", "ti_token_clean", "ti_attack_recovery", "h_o", "seconds", "unet_passes"):
        assert key in report
    assert 0 <= report["acc_erased"] <= 1 and report["unet_passes"] > 0
    evaluate.save_pictures(tmp_path / "r.json", result, generated, sets, "tiny")
    assert (tmp_path / "r.grid.png").is_file() and (tmp_path / "r.loss.png").is_file()
