"""Train the mini SD2-architecture model on the procedural world (seeded, CPU, time-boxed).

    python -m bench.train_world_model --out out/world_model --minutes 25

CLIPTextModel (gelu, real CLIP BPE tokenizer; its last hidden state is the conditioning, as in
diffusers' SD2), UNet2DConditionModel with cross-attention, AutoencoderKL, v-prediction DDPM
schedule, saved as a diffusers folder (fp16) with a manifest.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import world

TEXT = dict(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="gelu", projection_dim=64, bos_token_id=49406,
            eos_token_id=49407, pad_token_id=0)
UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(48, 96),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
            attention_head_dim=8, norm_num_groups=16, use_linear_projection=True)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
           layers_per_block=1, norm_num_groups=16, sample_size=32)


def train_vae(images: torch.Tensor, steps: int, log):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**VAE)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        batch = images[torch.randint(0, len(images), (32,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        loss = F.mse_loss(reconstruction, batch) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step} loss {loss.item():.5f}")
    vae.eval()
    return vae, loss.item()


def tune_decoder(vae, images: torch.Tensor, steps: int, log, lr: float = 3e-4) -> float:
    """Train the VAE's decoder alone: the encoder, and so the latents the UNet learnt, stay as they are. A short VAE
    run blurs corners and curves alike (the committed model's VAE turned 41 of 100 circles into hexagons by
    encoding and decoding alone), which no diffusion training can undo. L1 with MSE keeps edges sharper."""
    decoder = [*vae.post_quant_conv.parameters(), *vae.decoder.parameters()]
    for parameter in vae.parameters():
        parameter.requires_grad_(False)
    for parameter in decoder:
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(decoder, lr=lr)
    generator = torch.Generator().manual_seed(3)
    loss = torch.tensor(float("nan"))
    vae.train()
    for step in range(steps):
        batch = images[torch.randint(0, len(images), (32,), generator=generator)]
        with torch.no_grad():
            latents = vae.encode(batch).latent_dist.sample(generator)
        reconstruction = vae.decode(latents).sample
        loss = F.l1_loss(reconstruction, batch) + F.mse_loss(reconstruction, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"decoder step {step} loss {loss.item():.5f}")
    vae.eval().requires_grad_(False)
    return loss.item()


def sampling_weights(labels: list[world.Label], factors: dict[str, float]) -> torch.Tensor:
    """How often each training image is drawn: the product of the factors of the concepts its label names (1 for
    concepts not named). Diffusion loss barely tells a hexagon from a circle at 32 px, so more steps alone do not
    separate them; drawing the confused shapes more often does."""
    unknown = sorted(set(factors) - set(world.CONCEPT_KINDS))
    if unknown:
        raise ValueError(f"unknown concept(s) {', '.join(unknown)}; known: {', '.join(world.CONCEPT_KINDS)}")
    if any(not factor > 0 for factor in factors.values()):
        raise ValueError(f"oversampling factors must be positive, got {factors}")
    return torch.tensor([math.prod(factors.get(value, 1.0) for value in (label.shape, label.colour, label.style))
                         for label in labels], dtype=torch.float64)


def _factor(text: str) -> tuple[str, float]:
    concept, _, factor = text.partition("=")
    try:
        return concept, float(factor)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CONCEPT=FACTOR such as hexagon=3, got {text!r}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/world_model",
                        help="where to write (default out/world_model; copy it over the committed one when it is better)")
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--vae-steps", type=int, default=400)
    parser.add_argument("--minutes", type=float, default=25.0, help="time box for the diffusion training")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate at the start")
    parser.add_argument("--final-lr-fraction", type=float, default=1.0,
                        help="decay the learning rate linearly over the time box down to this fraction of --lr")
    parser.add_argument("--init", help="continue from a saved world model folder (its VAE is kept, not retrained)")
    parser.add_argument("--decoder-steps", type=int, default=0,
                        help="with --init: first train the VAE's decoder alone for this many steps (the latents stay "
                             "the same); --minutes 0 then skips the diffusion training")
    parser.add_argument("--oversample", type=_factor, action="append", default=[], metavar="CONCEPT=FACTOR",
                        help="draw images naming CONCEPT FACTOR times as often in the diffusion training (repeatable)")
    args = parser.parse_args()
    if args.decoder_steps and not args.init:
        parser.error("--decoder-steps tunes the decoder of an existing model: give --init FOLDER")
    torch.set_num_threads(args.threads)

    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from unlearn_core.diffusers_backend import CONFIG_DIR

    torch.manual_seed(args.seed)
    start = time.time()
    log = lambda message: print(f"[{time.time() - start:7.1f}s] {message}", flush=True)  # noqa: E731
    pixels, labels, captions = world.sample(args.images, seed=args.seed)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    log(f"{len(images)} images drawn")
    oversample = dict(args.oversample)
    try:
        weights = sampling_weights(labels, oversample) if oversample else None
    except ValueError as error:
        parser.error(str(error))

    if args.init:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.init, subfolder="vae", torch_dtype=torch.float32).eval()
        vae_loss = json.loads((Path(args.init) / "manifest.json").read_text())["final_vae_loss"]
        scaling = vae.config.scaling_factor
        decoder_loss = tune_decoder(vae, images, args.decoder_steps, log) if args.decoder_steps else None
    else:
        vae, vae_loss = train_vae(images, args.vae_steps, log)
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i:i + 500]).latent_dist.mean for i in range(0, len(images), 500)])
    if not args.init:
        scaling = float(1 / latents.std())
        vae.register_to_config(scaling_factor=scaling)
    latents = latents * scaling
    log(f"latents {tuple(latents.shape)}, scaling factor {scaling:.4f}")

    tokenizer = CLIPTokenizer.from_pretrained(str(CONFIG_DIR / "tokenizer"))
    ids = tokenizer(captions + [""], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    empty_ids = ids[-1:]
    ids = ids[:-1]
    if args.init:
        text_encoder = CLIPTextModel.from_pretrained(args.init, subfolder="text_encoder", dtype=torch.float32)
        unet = UNet2DConditionModel.from_pretrained(args.init, subfolder="unet", torch_dtype=torch.float32)
        previous = json.loads((Path(args.init) / "manifest.json").read_text())
    else:
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT))
        unet = UNet2DConditionModel(**UNET)
        previous = None
    scheduler_config = DDIMScheduler.load_config(str(CONFIG_DIR / "scheduler"))
    schedule = DDPMScheduler.from_config(scheduler_config)
    alphas = schedule.alphas_cumprod
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(args.seed + 2)
    losses, step = [], 0
    begin = time.time()
    deadline = begin + args.minutes * 60
    while time.time() < deadline:
        progress = (time.time() - begin) / (deadline - begin)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * (1 - (1 - args.final_lr_fraction) * progress)
        size = args.batch_size
        if weights is None:
            index = torch.randint(0, len(latents), (size,), generator=generator)
        else:
            index = torch.multinomial(weights, size, replacement=True, generator=generator)
        x0 = latents[index]
        batch_ids = ids[index].clone()
        drop = torch.rand(size, generator=generator) < 0.1
        batch_ids[drop] = empty_ids
        t = torch.randint(0, len(alphas), (size,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * x0
        prediction = unet(x_t, t, encoder_hidden_states=text_encoder(batch_ids)[0]).sample
        loss = F.mse_loss(prediction, target)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 200 == 0:
            log(f"diffusion step {step} loss {np.mean(losses[-200:]):.4f}")
        step += 1

    out = Path(args.out)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet.eval(),
                                   scheduler=DDIMScheduler.from_config(scheduler_config), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(str(out), safe_serialization=True)
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "manifest.json")
    manifest = {
        "command": "python -m bench.train_world_model " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "seed": args.seed, "images": args.images, "vae_steps": args.vae_steps, "diffusion_steps": step,
        "minutes": round((time.time() - start) / 60, 1), "final_vae_loss": round(vae_loss, 5),
        "final_diffusion_loss_last200": round(float(np.mean(losses[-200:])), 5) if losses else None,
        **({"oversample": oversample} if oversample else {}),
        **({"decoder_steps": args.decoder_steps, "final_decoder_loss": round(decoder_loss, 5)} if args.decoder_steps else {}),
        "config": {"text_encoder": TEXT, "unet": UNET, "vae": VAE, "vae_scaling_factor": scaling},
        "continued_from": previous,
        "sha256": {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    log(f"saved {out} after {step} diffusion steps")


if __name__ == "__main__":
    main()
