"""Speed and memory of an erase step, side by side in one run (ratios; absolute times are noisy here).

    python bench/speed.py                 # full SD2 shapes (random weights) at 256 px, 3 steps per variant
    python bench/speed.py --size tiny     # quick check

Variants, each in its own process so peak memory (max RSS) is its own:
  engine        the engine's erase step: LoRA deltas, UNet frozen, latents encoded once
  full-deltas   the engine with full-weight deltas (the paper's setting) instead of LoRA
  unet-grad     a naive loop: same loss, but the UNet's parameters require grad
  reencode      a naive loop: the VAE re-encodes the images every step
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("engine", "full-deltas", "unet-grad", "reencode")


def _setup(size: str, resolution: int):
    import torch

    from unlearn_core.diffusers_backend import DiffusersBackend
    from unlearn_core.tiny import build_pipeline

    torch.manual_seed(0)
    pipe = build_pipeline(full_size=(size == "full"))
    pipe.unet.eval()
    backend = DiffusersBackend(pipe)
    images = torch.rand(4, 3, resolution, resolution)
    return pipe, backend, images


def _engine_seconds(backend, images, mode: str, steps: int) -> float:
    from unlearn_core.config import EraseConfig, LoraConfig
    from unlearn_core.erase import erase

    times = []

    def clock(_info):
        times.append(time.perf_counter())

    start = time.perf_counter()
    erase(backend, EraseConfig(concept="a red star", steps=steps + 1, lora=LoraConfig(mode=mode),
                               lr=1e-5 if mode == "full" else 1e-3), images, callback=clock)
    return (times[-1] - times[0]) / steps if steps else time.perf_counter() - start


def _naive_seconds(pipe, backend, images, variant: str, steps: int) -> float:
    """The same weighted loss as the engine, written the naive way."""
    import torch

    from unlearn_core import objectives
    from unlearn_core.config import DEFAULT_PRESERVE
    from unlearn_core.lora import Deltas, target_shapes
    from unlearn_core.targets import resolve_targets
    from unlearn_core.tokens import encode
    from unlearn_core.train import noisy_batch

    deltas = Deltas(target_shapes(backend.linear, resolve_targets("fewshot", backend.num_layers)))
    optimizer = torch.optim.Adam(deltas.parameters(), lr=1e-3)
    pipe.text_encoder.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    pipe.unet.requires_grad_(variant == "unet-grad")
    generator = torch.Generator().manual_seed(0)
    with deltas.inject(backend.linear):
        with torch.no_grad(), deltas.off():
            anchor_cond = encode(backend, ["a photo"])
            keep = encode(backend, list(DEFAULT_PRESERVE))
        latents = backend.encode_images(images).detach()
        times = []
        for _ in range(steps + 1):
            if variant == "reencode":
                latents = backend.encode_images(images)
            x0, noise, t, x_t = noisy_batch(latents, backend.schedule, 2, generator)
            prediction = backend.predict(x_t, t, encode(backend, ["a red star"] * 2))
            with torch.no_grad(), deltas.off():
                anchor_prediction = backend.predict(x_t, t, anchor_cond.expand(2, -1, -1))
            loss = (objectives.ascent(prediction, backend.schedule.target(x0, noise, t))
                    + objectives.anchor(prediction, anchor_prediction)
                    + objectives.preserve(encode(backend, list(DEFAULT_PRESERVE)), keep))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter())
    return (times[-1] - times[0]) / steps


def measure(variant: str, size: str, resolution: int, steps: int) -> dict:
    pipe, backend, images = _setup(size, resolution)
    if variant in ("engine", "full-deltas"):
        seconds = _engine_seconds(backend, images, "full" if variant == "full-deltas" else "lora", steps)
    else:
        seconds = _naive_seconds(pipe, backend, images, variant, steps)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": variant, "seconds_per_step": seconds, "peak_rss_mb": peak_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("full", "tiny"), default="full")
    parser.add_argument("--resolution", type=int, default=None, help="default 256 (full) / 16 (tiny)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up step)")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    resolution = args.resolution or (256 if args.size == "full" else 16)
    if args.variant:
        print(json.dumps(measure(args.variant, args.size, resolution, args.steps)))
        return
    root = Path(__file__).resolve().parents[1]
    best: dict[str, dict] = {}
    # forwards then backwards, keeping each variant's fastest pass: load from other processes evens out
    for variant in VARIANTS + VARIANTS[::-1]:
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--size", args.size,
                              "--resolution", str(resolution), "--steps", str(args.steps)],
                             capture_output=True, text=True, cwd=root, env={"PYTHONPATH": str(root), "PATH": ""})
        if out.returncode:
            raise SystemExit(f"{variant} failed:\n{out.stderr[-2000:]}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        if variant not in best or row["seconds_per_step"] < best[variant]["seconds_per_step"]:
            best[variant] = row
    rows = [best[v] for v in VARIANTS]
    base = rows[0]
    print(f"erase step, SD2 {args.size} shapes, {resolution} px, batch 2, best of 2 runs x {args.steps} timed steps")
    print(f"{'variant':<12} {'s/step':>8} {'x engine':>9} {'peak MB':>9} {'x engine':>9}")
    for row in rows:
        print(f"{row['variant']:<12} {row['seconds_per_step']:8.2f} {row['seconds_per_step'] / base['seconds_per_step']:9.2f} "
              f"{row['peak_rss_mb']:9.0f} {row['peak_rss_mb'] / base['peak_rss_mb']:9.2f}")


if __name__ == "__main__":
    main()
