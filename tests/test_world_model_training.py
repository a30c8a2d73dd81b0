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
