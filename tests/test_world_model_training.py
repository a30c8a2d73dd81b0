"""The world model's training stages (bench/train_world_model.py), on a small untrained VAE."""
import torch
import torch.nn.functional as F

from bench import train_world_model, world


def test_tuning_the_decoder_lowers_its_error_and_leaves_the_latents_as_they_were():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**train_world_model.VAE).eval()
    pixels, _, _ = world.sample(64, seed=1)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1

    def state():
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.mean
            return latents, F.mse_loss(vae.decode(latents).sample, images).item()

    latents_before, error_before = state()
    train_world_model.tune_decoder(vae, images, steps=40, log=lambda message: None, lr=1e-3)
    latents_after, error_after = state()
    assert torch.equal(latents_before, latents_after), "the encoder (what the UNet learnt to model) is untouched"
    assert error_after < 0.5 * error_before
    assert not any(p.requires_grad for p in vae.parameters())


def test_oversampling_draws_the_named_concepts_that_many_times_as_often():
    labels = [world.Label("hexagon", "red", "plain"), world.Label("circle", "red", "plain"),
              world.Label("hexagon", "blue", "plain"), world.Label("square", "green", "sketch")]
    weights = train_world_model.sampling_weights(labels, {"hexagon": 3.0, "red": 2.0})
    assert weights.tolist() == [6.0, 2.0, 3.0, 1.0]
    draws = torch.multinomial(weights, 20000, replacement=True, generator=torch.Generator().manual_seed(0))
    share = torch.bincount(draws, minlength=4).double() / len(draws)
    assert torch.allclose(share, weights / weights.sum(), atol=0.02)


def test_oversampling_refuses_unknown_concepts_and_non_positive_factors():
    import pytest

    labels = [world.Label("hexagon", "red", "plain")]
    with pytest.raises(ValueError, match="unknown concept"):
        train_world_model.sampling_weights(labels, {"heptagon": 2.0})
    with pytest.raises(ValueError, match="positive"):
        train_world_model.sampling_weights(labels, {"hexagon": 0.0})
