"""Behaviour of textual inversion and erasure on a tiny SD2-architecture model."""
import pytest
import torch

from conftest import assert_identical, snapshot
from unlearn_core import objectives
from unlearn_core.config import EraseConfig, LoraConfig, TokenConfig
from unlearn_core.erase import erase
from unlearn_core.inversion import learn_token
from unlearn_core.tokens import ConceptToken, encode, init_vectors
from unlearn_core.train import Cancelled, TrainingDiverged, noisy_batch


def _fixed_batches(backend, images, count=8, seed=123):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        latents = backend.encode_images(images)
    return [noisy_batch(latents, backend.schedule, 4, generator) for _ in range(count)]


def _denoise_loss(backend, batches, prompt, token=None):
    with torch.no_grad():
        cond = encode(backend, [prompt] * 4, token)
        return sum(float(objectives.denoise(backend.predict(x_t, t, cond), backend.schedule.target(x0, n, t)))
                   for x0, n, t, x_t in batches) / len(batches)


def test_textual_inversion_loss_falls_on_held_out_noise(sensitive, images):
    _, backend = sensitive
    batches = _fixed_batches(backend, images)
    start = ConceptToken("<sq>", init_vectors(backend, "object", 2))
    result = learn_token(backend, images, TokenConfig(token="<sq>", n_vectors=2, steps=40, lr=5e-2))
    before = _denoise_loss(backend, batches, "a photo of <sq>", start)
    after = _denoise_loss(backend, batches, "a photo of <sq>", result.token)
    assert after < before * 0.97, (before, after)
    assert not torch.equal(result.token.vectors, start.vectors)


def test_textual_inversion_with_per_image_captions_loss_falls(sensitive, images):
    _, backend = sensitive
    batches = _fixed_batches(backend, images)
    captions = tuple(f"a {{}} number {i}" for i in range(len(images)))
    start = ConceptToken("<sq>", init_vectors(backend, "object", 1))
    result = learn_token(backend, images, TokenConfig(token="<sq>", steps=40, lr=5e-2, captions=captions))
    before = _denoise_loss(backend, batches, "a <sq> number 0", start)
    after = _denoise_loss(backend, batches, "a <sq> number 0", result.token)
    assert after < before * 0.97, (before, after)
    with pytest.raises(ValueError, match="one caption per image"):
        learn_token(backend, images, TokenConfig(token="<sq>", steps=1, captions=captions[:1]))


def test_erase_moves_the_concept_away_from_the_images(sensitive, images):
    _, backend = sensitive
    batches = _fixed_batches(backend, images)
    result = erase(backend, EraseConfig(concept="a red square", method="fewshot", steps=20, lr=1e-2), images)
    before = _denoise_loss(backend, batches, "a red square")
    with result.deltas.inject(backend.linear):
        after = _denoise_loss(backend, batches, "a red square")
    assert after > before * 1.05, (before, after)


def test_preserve_term_keeps_unrelated_conditioning_close(backend, images):
    def drift(preserve_weight):
        config = EraseConfig(concept="a red square", method="fewshot", steps=15, lr=2e-2,
                             preserve=("a green tree", "a photo"), preserve_weight=preserve_weight)
        result = erase(backend, config, images)
        with torch.no_grad():
            frozen = encode(backend, ["a green tree"])
            with result.deltas.inject(backend.linear):
                return float((encode(backend, ["a green tree"]) - frozen).pow(2).mean())

    assert drift(preserve_weight=50.0) < 0.5 * drift(preserve_weight=0.0)


def test_anchor_method_pulls_concept_towards_anchor_prediction(sensitive, images):
    _, backend = sensitive
    batches = _fixed_batches(backend, images)

    def gap(deltas=None):
        with torch.no_grad():
            anchor = encode(backend, ["a photo"] * 4)
            total = 0.0
            for _, _, t, x_t in batches:
                target = backend.predict(x_t, t, anchor)
                if deltas is None:
                    total += float(objectives.anchor(backend.predict(x_t, t, encode(backend, ["a red square"] * 4)), target))
                else:
                    with deltas.inject(backend.linear):
                        total += float(objectives.anchor(backend.predict(x_t, t, encode(backend, ["a red square"] * 4)), target))
            return total

    result = erase(backend, EraseConfig(concept="a red square", method="anchor", steps=30, lr=1e-3,
                                        preserve_weight=0.0), images)
    assert gap(result.deltas) < 0.6 * gap()


def test_same_seed_gives_identical_adapters(backend, images):
    config = EraseConfig(concept="a red square", steps=3, lr=1e-2)
    first = erase(backend, config, images).deltas.to_kohya()
    second = erase(backend, config, images).deltas.to_kohya()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def _unet_and_text_snapshots(pipe):
    return snapshot(pipe.unet), snapshot(pipe.text_encoder), snapshot(pipe.vae)


def _assert_model_untouched(pipe, snapshots):
    for module, before in zip((pipe.unet, pipe.text_encoder, pipe.vae), snapshots):
        assert_identical(module, before)
        assert all(not m._forward_hooks for m in module.modules()), "a hook was left behind"
    for module in (pipe.unet, pipe.text_encoder, pipe.vae):  # diffusers/transformers load them trainable
        assert all(p.requires_grad for p in module.parameters()), f"{type(module).__name__}: requires_grad not restored"
    assert all(p.grad is None for p in pipe.text_encoder.parameters()), "base weights received gradients"


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_base_weights_bit_identical_after_erase(pipe, backend, images, mode):
    snapshots = _unet_and_text_snapshots(pipe)
    erase(backend, EraseConfig(concept="a red square", steps=3, lr=1e-2, lora=LoraConfig(mode=mode)), images)
    _assert_model_untouched(pipe, snapshots)


def test_base_weights_bit_identical_after_cancel(pipe, backend, images):
    snapshots = _unet_and_text_snapshots(pipe)

    def cancel_at_two(info):
        if info.step == 2:
            raise Cancelled()

    with pytest.raises(Cancelled):
        erase(backend, EraseConfig(concept="a red square", steps=10), images, callback=cancel_at_two)
    _assert_model_untouched(pipe, snapshots)


def test_divergence_stops_with_a_clear_error_and_model_untouched(pipe, backend, images):
    snapshots = _unet_and_text_snapshots(pipe)
    config = EraseConfig(concept="a red square", method="fewshot", steps=10, lr=1e30, preserve_weight=0.0)
    with pytest.raises(TrainingDiverged, match="lower the learning rate"):
        erase(backend, config, images)
    _assert_model_untouched(pipe, snapshots)


def test_failed_token_learning_leaves_model_untouched(pipe, backend, images):
    snapshots = _unet_and_text_snapshots(pipe)

    def fail(info):
        raise RuntimeError("simulated host failure")

    with pytest.raises(RuntimeError, match="simulated"):
        learn_token(backend, images, TokenConfig(token="<sq>", steps=5), callback=fail)
    _assert_model_untouched(pipe, snapshots)


def test_unet_parameters_never_require_grad_during_a_run(pipe, backend, images):
    seen = []
    erase(backend, EraseConfig(concept="a red square", steps=2), images,
          callback=lambda info: seen.append(any(p.requires_grad for p in pipe.unet.parameters())))
    assert seen == [False, False]


def test_gradient_surgery_removes_the_conflicting_component():
    from unlearn_core.train import conflict_free_backward

    p = torch.nn.Parameter(torch.zeros(2))
    erase_term = (p * torch.tensor([1.0, 1.0])).sum()  # gradient (1, 1)
    keep_term = (p * torch.tensor([-1.0, 0.0])).sum()  # gradient (-1, 0): conflicts
    conflict_free_backward({"erase": erase_term, "keep": keep_term}, [p])
    assert torch.allclose(p.grad, torch.tensor([-1.0, 1.0]))  # erase -> (0, 1), plus keep

    q = torch.nn.Parameter(torch.zeros(2))
    conflict_free_backward({"erase": (q * torch.tensor([1.0, 1.0])).sum(),
                            "keep": (q * torch.tensor([1.0, 0.0])).sum()}, [q])
    assert torch.allclose(q.grad, torch.tensor([2.0, 1.0]))  # no conflict: plain sum


def test_erase_with_gradient_surgery_keeps_preserved_prompts_closer(sensitive, images):
    _, backend = sensitive

    def drift(surgery):
        config = EraseConfig(concept="a red square", method="fewshot", steps=15, lr=1e-3,
                             preserve=("a green tree", ""), gradient_surgery=surgery)
        result = erase(backend, config, images)
        with torch.no_grad():
            frozen = encode(backend, ["a green tree"])
            with result.deltas.inject(backend.linear):
                return float((encode(backend, ["a green tree"]) - frozen).pow(2).mean())

    assert drift(True) < drift(False)


def test_token_is_matched_as_a_whole_word_only(backend):
    token = ConceptToken("cat", torch.randn(1, backend.width) * 10)
    with torch.no_grad():
        inside_words = ["a concatenated cats picture", "bobcat-cat"]
        assert torch.equal(encode(backend, inside_words, token), encode(backend, inside_words))
        assert not torch.equal(encode(backend, ["a cat"], token), encode(backend, ["a cat"]))
