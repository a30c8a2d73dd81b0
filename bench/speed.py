"""Speed and memory of the default erase (method "contextual"), side by side in one run (issue 14).

    python bench/speed.py                      # full SD2 text-encoder shapes, the main table
    python bench/speed.py --size tiny          # quick check
    python bench/speed.py --scale              # growth with prompts per step, contexts and concepts
    python bench/speed.py --weighted           # the older weighted method's step (UNet passes) vs naive loops

The contextual method never calls the UNet: its cost is text-encoder forward + backward passes over prompt
batches (erase prompts in their contexts, keep prompts, the empty prompt), ``steps`` times. Variants, each in its
own process so its peak memory is its own:
  bare        those passes alone: the same prompt counts per step, token ids made once beforehand, forward +
              gradient w.r.t. the LoRA deltas, nothing else (no targets, no optimizer)
  job         the whole erase as a user runs it: EraseConfig in -> erase() -> adapter file written
  job-plain   the job with the engine's caches off (cache=(): every prompt re-tokenized every step, and every
              step runs the full text encoder): shows what the caches give
  reference   the same algorithm written the straightforward way: every step re-tokenizes and re-encodes the
              frozen targets of its batch (concept, anchor/neighbours, keep, empty), full forward, one host sync
              per loss term and per parameter (.item()), no caching
Rows with a preset other than the default ("final", last_k) show the frozen-layer cache: with deltas on the last
k layers only, the layers below run once per prompt.
Peak memory: resident set size (RSS) with the model loaded, and the peak during the run above it.
"""
from __future__ import annotations

import argparse
import json
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONCEPT = "a red star"
KEEP = ("a blue star", "a red circle")
CAPTIONS = ("a {} on dots", "a {} as a sketch", "a big {} on a plain background", "a small {} with stripes",
            "a {} in the corner", "a tilted {} on a white page", "a faded {} on stripes", "a bright {} drawn in ink")
OTHER_CONCEPTS = ("a green hexagon", "a purple ring", "a yellow cross", "an orange diamond")  # joint runs
SIZES = {"full": dict(layers=23, width=1024), "reduced": dict(layers=23, width=256), "small": dict(layers=8, width=512),
         "tiny": dict(layers=4, width=32)}
VARIANTS = ("bare", "job", "job-plain", "reference")


# ---------------------------------------------------------------------------- measuring in a child process

def _status(key: str) -> int:
    """A /proc/self/status field in MB (VmRSS: resident now, VmHWM: its peak)."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1)) // 1024


def _reset_peak() -> bool:
    try:  # Linux: "5" resets the peak RSS (VmHWM) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _now() -> tuple[float, float]:
    """(wall-clock, this process's CPU time) in seconds: on a shared machine the CPU time of a one-thread run is the
    steadier measure of work; both are reported."""
    return time.perf_counter(), time.process_time()


def _build(size: str, full_unet: bool = False):
    """A pipeline whose text encoder has the size's shapes (full: SD2's, 23 layers x 1024, 77 tokens). UNet and
    VAE are small (the contextual method never calls them), except the UNet with ``full_unet`` (SD2's: the key/value
    edit reads and edits its cross-attention projections)."""
    import torch

    from unlearn_core.diffusers_backend import CONFIG_DIR, DiffusersBackend
    from unlearn_core.tiny import build_pipeline

    torch.manual_seed(0)
    shape = SIZES[size]
    pipe = build_pipeline(width=shape["width"], layers=shape["layers"])
    if size == "full":
        from transformers import CLIPTextConfig, CLIPTextModel

        pipe.text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(str(CONFIG_DIR / "text_encoder")))
    if full_unet:
        from diffusers import UNet2DConditionModel

        pipe.unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(CONFIG_DIR / "unet")))
    pipe.text_encoder.eval()
    return DiffusersBackend(pipe)


def job_config(opts: dict):
    from unlearn_core.methods import method_config

    also = OTHER_CONCEPTS[:opts["concepts"] - 1]
    return method_config("contextual", CONCEPT, steps=opts["steps"] + 1, contexts=CAPTIONS,
                         keep=KEEP[:opts["neighbours"]], max_contexts=opts["max_contexts"],
                         prompt_batch=opts["prompt_batch"], preset=opts["preset"], last_k=opts["last_k"],
                         also=also or None, unet_kv_edit=opts.get("kv", False))


def prompt_pools(config):
    """The erase prompts (with their anchor prompts' owners) and keep prompts the engine builds for ``config``."""
    from unlearn_core.contexts import build_contexts, erase_pairs, keep_prompts
    from unlearn_core.erase import joint_prompts

    contexts = build_contexts(config.contexts, config.kind, config.max_contexts, config.seed)
    keep = keep_prompts(contexts, config.keep, config.preserve)
    neighbours = config.keep
    if config.also:
        contexts, keep, neighbours, _ = joint_prompts(config, contexts, keep)
    erase = [pair for c in config.concepts for pair in erase_pairs(contexts, list(c.phrases), config.anchor)]
    return contexts, erase, keep, neighbours


def _job(backend, config, cache) -> list[float]:
    from unlearn_core.adapter_io import base_fingerprint, write_adapter
    from unlearn_core.erase import erase

    stamps = [_now()]
    result = erase(backend, config, callback=lambda _info: stamps.append(_now()), cache=cache)
    assert result.unet_calls == 0
    with tempfile.TemporaryDirectory() as folder:
        write_adapter(Path(folder) / "erased.safetensors", result.deltas, base_fingerprint(backend), result.info(),
                      unet=result.unet_deltas)
        stamps.append(_now())
    return stamps


def _deltas(backend, config):
    from unlearn_core.erase import _new_deltas

    return _new_deltas(backend, config)


def _bare(backend, config) -> list[float]:
    """The text-encoder passes alone: per step, the job's prompt counts, ids made beforehand, forward + gradient."""
    import torch

    from unlearn_core.train import training_context

    _, erase, keep, _ = prompt_pools(config)
    n_erase, n_keep = min(config.prompt_batch, len(erase)), min(config.prompt_batch, len(keep))
    ids = backend.tokenize([p for p, _ in erase[:n_erase]] + keep[:n_keep] + [""])
    deltas = _deltas(backend, config)
    params = list(deltas.parameters())
    stamps = [_now()]
    with training_context(backend), deltas.inject(backend.linear):
        for _ in range(config.steps):
            loss = backend.encode_ids(ids).float().pow(2).mean()
            torch.autograd.grad(loss, params)
            stamps.append(_now())
    return stamps


def reference_erase(backend, config, callback=None):
    """The contextual method written the straightforward way (same loss, same sampling, same result as the
    engine's): each step re-tokenizes its prompts, re-encodes the frozen targets of its batch through the whole
    text encoder, and reads every loss term and every parameter's finiteness back to the host one by one."""
    import torch

    from unlearn_core import objectives
    from unlearn_core.contexts import fill
    from unlearn_core.tokens import encode
    from unlearn_core.train import training_context

    generator = torch.Generator().manual_seed(config.seed)
    deltas = _deltas(backend, config)
    contexts, pairs, keep, neighbours = prompt_pools(config)
    per_context = [len(c.phrases) for c in config.concepts]
    owner = []  # each erase prompt's context (pairs are concept-major, then context, then phrase)
    for n in per_context:
        owner += [c for c in contexts for _ in range(n)]

    def frozen_targets(index):  # where each prompt's conditioning should go, encoded afresh (batched)
        concept = encode(backend, [pairs[i][0] for i in index])
        if config.anchor or not neighbours:
            anchor = encode(backend, [pairs[i][1] for i in index])
        else:
            anchor = encode(backend, [fill(owner[i], k) for i in index for k in neighbours])
            anchor = anchor.view(len(index), len(neighbours), *anchor.shape[1:]).mean(1)
        return objectives.negative_target(anchor, concept, config.negative_guidance)

    history = []
    with training_context(backend), deltas.inject(backend.linear):
        with torch.no_grad(), deltas.off():
            first = len(contexts) * per_context[0]
            scale = torch.cat([frozen_targets(list(range(i, min(i + 64, first))))
                               for i in range(0, first, 64)]).float().pow(2).mean()
        optimizer = torch.optim.Adam(deltas.parameters(), lr=config.lr, betas=tuple(config.betas))
        for step in range(config.steps):
            erase_index = torch.randperm(len(pairs), generator=generator)[:config.prompt_batch].tolist()
            keep_index = torch.randperm(len(keep), generator=generator)[:config.prompt_batch].tolist()
            with torch.no_grad(), deltas.off():
                targets = frozen_targets(erase_index)
                keep_targets = encode(backend, [keep[i] for i in keep_index])
                empty_target = encode(backend, [""])
            erase_cond = encode(backend, [pairs[i][0] for i in erase_index])
            keep_cond = encode(backend, [keep[i] for i in keep_index])
            empty_cond = encode(backend, [""])
            terms = {"erase": objectives.conditioning_match(erase_cond, targets, scale),
                     "empty": objectives.conditioning_match(empty_cond, empty_target, scale),
                     "keep": objectives.conditioning_match(keep_cond, keep_targets, scale)}
            terms["loss"] = terms["erase"] + config.empty_weight * terms["empty"] + config.preserve_weight * terms["keep"]
            optimizer.zero_grad()
            terms["loss"].backward()
            optimizer.step()
            record = {name: value.item() for name, value in terms.items()}
            for p in deltas.parameters():
                if not torch.isfinite(p).all().item():
                    raise RuntimeError("diverged")
            history.append(record)
            if callback is not None:
                callback(step)
    return deltas.cpu(), history


def _reference(backend, config) -> list[float]:
    from unlearn_core.adapter_io import base_fingerprint, write_adapter

    stamps = [_now()]
    deltas, _ = reference_erase(backend, config, callback=lambda _step: stamps.append(_now()))
    with tempfile.TemporaryDirectory() as folder:
        write_adapter(Path(folder) / "erased.safetensors", deltas, base_fingerprint(backend), {})
        stamps.append(_now())
    return stamps


def measure(variant: str, opts: dict) -> dict:
    import torch

    torch.manual_seed(0)
    backend = _build(opts["size"], full_unet=opts.get("kv", False) and opts["size"] == "full")
    config = job_config(opts)
    model_mb = _status("VmRSS")
    reset = _reset_peak()
    if variant == "bare":
        stamps = _bare(backend, config) + [None]
    elif variant in ("job", "job-plain"):
        stamps = _job(backend, config, ("ids", "layers") if variant == "job" else ())
    else:
        stamps = _reference(backend, config)
    end = stamps.pop()

    def series(k):  # median of the timed steps (after the first: warm-up / setup), setup, writing the file
        times = [stamp[k] for stamp in stamps]
        steps = [b - a for a, b in zip(times[1:], times[2:])]
        per_step = statistics.median(steps)
        return (per_step, max(times[1] - times[0] - per_step, 0.0), (end[k] - times[-1]) if end else 0.0,
                len(steps))

    per_step, setup, finish, timed = series(1)
    wall_step, wall_setup, _, _ = series(0)
    peak = _status("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    _, erase, keep, _ = prompt_pools(config)
    step_prompts = [p for p, _ in erase[:config.prompt_batch]] + keep[:config.prompt_batch] + [""]
    start = time.process_time()
    for _ in range(20):  # what the token-id cache takes out of every step
        backend.tokenize(step_prompts)
    tokenize = (time.process_time() - start) / 20
    return {"variant": variant, "tokenize_step": tokenize, "per_step": per_step, "setup": setup, "finish": finish,
            "timed_steps": timed, "wall_step": wall_step, "wall_setup": wall_setup,
            "model_mb": model_mb, "run_peak_mb": peak - model_mb if reset else None, "peak_rss_mb": peak,
            "erase_prompts": len(erase), "keep_prompts": len(keep),
            "prompts_per_step": min(config.prompt_batch, len(erase)) + min(config.prompt_batch, len(keep)) + 1}


def _child(variant: str, opts: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", variant, json.dumps(opts)], capture_output=True,
                         text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "", "OMP_NUM_THREADS": str(
                             opts["threads"])} if opts["threads"] else {"PYTHONPATH": str(ROOT), "PATH": ""})
    if out.returncode:
        raise SystemExit(f"{variant} failed:\n{out.stderr[-3000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  measured {variant} {json.dumps({k: opts[k] for k in ('preset', 'last_k', 'prompt_batch', 'max_contexts', 'concepts')})}: "
          f"{row['per_step']:.3f} s/step", file=sys.stderr, flush=True)
    return row


# ---------------------------------------------------------------------------- tables

def _projected(row: dict, steps: int) -> float:
    return row["setup"] + steps * row["per_step"] + row["finish"]


def main_table(opts: dict, finals: list[int], variants=VARIANTS, kv: bool = False) -> None:
    rows = {v: _child(v, opts) for v in variants}
    if kv:
        rows["job + kv edit"] = _child("job", opts | {"kv": True})
    for k in finals:
        final = opts | {"preset": "final", "last_k": k}
        for v in ("bare", "job", "job-plain"):
            rows[f"{v} final-{k}"] = _child(v, final)
    bare, job = rows["bare"], rows["job"]
    steps = 200
    print(f"\ncontextual erase, text encoder {opts['size']} ({SIZES[opts['size']]['layers']} layers x "
          f"{SIZES[opts['size']]['width']}, 77 tokens), random weights, CPU, {opts['prompt_batch']} prompts per "
          f"batch ({job['prompts_per_step']} per step: erase + keep + empty), {job['erase_prompts']} erase / "
          f"{job['keep_prompts']} keep prompts ({opts['max_contexts']} contexts), {opts['timed_steps']} timed "
          f"steps after one warm-up step per variant, {opts['threads'] or 'default'} thread(s); CPU = the process's CPU "
          f"seconds (steadier than wall time on this shared machine; wall shown too); 'job {steps}' = setup + {steps} x "
          "s/step + writing the file, from the measured parts")
    print(f"\n| variant | CPU s/step | x bare | wall s/step | setup CPU s | after training CPU s | job {steps} steps "
          f"CPU s | x bare | model RSS MB | run peak MB (above model) |\n|---|---|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        ref = rows["bare" + (name[len(name.split()[0]):] if "final" in name else "")]  # bare of the same preset
        total = _projected(row, steps)
        print(f"| {name} | {row['per_step']:.3f} | {row['per_step'] / ref['per_step']:.2f} | {row['wall_step']:.3f} | "
              f"{row['setup']:.2f} | {row['finish']:.2f} | {total:.1f} | {total / (steps * ref['per_step']):.2f} | "
              f"{row['model_mb']} | {row['run_peak_mb']} |")
    print(f"\noverhead = job / bare: per step {job['per_step'] / bare['per_step']:.3f}, whole {steps}-step job "
          f"{_projected(job, steps) / (steps * bare['per_step']):.3f}")
    if "reference" in rows:
        print(f"speedup = reference / job: per step {rows['reference']['per_step'] / job['per_step']:.2f}, whole job "
              f"{_projected(rows['reference'], steps) / _projected(job, steps):.2f}")
    for k in finals:
        cached, plain = rows[f"job final-{k}"], rows[f"job-plain final-{k}"]
        print(f"frozen-layer cache, preset final last_k {k}: {plain['per_step'] / cached['per_step']:.2f}x per step")
    if "job-plain" in rows:
        print(f"token-id cache (job-plain / job, default preset): {rows['job-plain']['per_step'] / job['per_step']:.3f}x"
              " per step")
    print(f"tokenizing one step's {job['prompts_per_step']} prompts takes {1000 * job['tokenize_step']:.1f} ms "
          f"({100 * job['tokenize_step'] / job['per_step']:.2f} % of a job step), which the cache removes")


def scale_table(opts: dict) -> None:
    runs = ([opts | {"prompt_batch": b, "max_contexts": 24} for b in (8, 16, 32)]
            + [opts | {"prompt_batch": 16, "max_contexts": c} for c in (12, 48)]
            + [opts | {"prompt_batch": 16, "max_contexts": 24, "concepts": 5}])
    print(f"\nscale: contextual job, text encoder {opts['size']} ({SIZES[opts['size']]['layers']} layers x "
          f"{SIZES[opts['size']]['width']}), {opts['timed_steps']} timed steps after one warm-up step, "
          f"{opts['threads'] or 'default'} thread(s)\n")
    print("| prompts/batch | contexts | concepts | erase / keep prompts | prompts/step | CPU s/step | wall s/step | "
          "setup CPU s | run peak MB |\n|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        row = _child("job", run)
        print(f"| {run['prompt_batch']} | {run['max_contexts']} | {run['concepts']} | {row['erase_prompts']} / "
              f"{row['keep_prompts']} | {row['prompts_per_step']} | {row['per_step']:.3f} | {row['wall_step']:.3f} | "
              f"{row['setup']:.2f} | "
              f"{row['run_peak_mb']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=tuple(SIZES), default="full")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant (after one warm-up step)")
    parser.add_argument("--prompt-batch", type=int, default=32, help="EraseConfig.prompt_batch (default 32)")
    parser.add_argument("--max-contexts", type=int, default=48, help="EraseConfig.max_contexts (default 48)")
    parser.add_argument("--neighbours", type=int, default=2, choices=(0, 1, 2), help="keep words (neighbours)")
    parser.add_argument("--final", type=int, nargs="*", default=[1], help="last_k values of preset 'final' rows")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the children (0: torch's own)")
    parser.add_argument("--scale", action="store_true", help="growth with prompts per step, contexts and concepts")
    parser.add_argument("--weighted", action="store_true", help="the weighted method's step (UNet) instead")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="default-preset rows to measure (bare and job are always measured)")
    parser.add_argument("--kv", action="store_true", help="add a row with the UNet key/value edit (unet_kv_edit), "
                        "full SD2 UNet at --size full; the other rows run without it")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        variant, raw = args.child
        opts = json.loads(raw)
        print(json.dumps(weighted_measure(variant, opts) if variant.startswith("weighted") else measure(variant, opts)))
        return
    opts = dict(size=args.size, steps=args.steps, timed_steps=args.steps, prompt_batch=args.prompt_batch,
                max_contexts=args.max_contexts, neighbours=args.neighbours, preset="fewshot", last_k=1, concepts=1,
                threads=args.threads)
    if args.weighted:
        weighted_table(opts)
    elif args.scale:
        scale_table(opts)
    else:
        main_table(opts, args.final, tuple(dict.fromkeys(["bare", "job", *args.variants])), args.kv)


# ---------------------------------------------------------------------------- the weighted method (UNet passes)

WEIGHTED = ("weighted-engine", "weighted-full-deltas", "weighted-unet-grad", "weighted-reencode")


def weighted_measure(variant: str, opts: dict) -> dict:
    """The older weighted method's step (one UNet pass with gradients + one frozen anchor pass) at 256 px (full) /
    16 px (tiny): the engine (LoRA or full-weight deltas) against naive loops (UNet parameters requiring grad, or
    the VAE re-encoding the images every step)."""
    import torch

    from unlearn_core.diffusers_backend import DiffusersBackend
    from unlearn_core.tiny import build_pipeline

    torch.manual_seed(0)
    pipe = build_pipeline(full_size=(opts["size"] == "full"))
    pipe.unet.eval()
    backend = DiffusersBackend(pipe)
    resolution = 256 if opts["size"] == "full" else 16
    images = torch.rand(4, 3, resolution, resolution)
    if variant in ("weighted-engine", "weighted-full-deltas"):
        seconds = _weighted_engine(backend, images, "full" if variant == "weighted-full-deltas" else "lora",
                                   opts["steps"])
    else:
        seconds = _weighted_naive(pipe, backend, images, variant, opts["steps"])
    return {"variant": variant, "per_step": seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}


def _weighted_engine(backend, images, mode: str, steps: int) -> float:
    from unlearn_core.config import EraseConfig, LoraConfig
    from unlearn_core.erase import erase

    times = []
    erase(backend, EraseConfig(concept=CONCEPT, method="weighted", steps=steps + 1, lora=LoraConfig(mode=mode),
                               lr=1e-5 if mode == "full" else 1e-3), images,
          callback=lambda _info: times.append(time.perf_counter()))
    return (times[-1] - times[0]) / steps


def _weighted_naive(pipe, backend, images, variant: str, steps: int) -> float:
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
    pipe.unet.requires_grad_(variant == "weighted-unet-grad")
    generator = torch.Generator().manual_seed(0)
    with deltas.inject(backend.linear):
        with torch.no_grad(), deltas.off():
            anchor_cond = encode(backend, ["a photo"])
            keep = encode(backend, list(DEFAULT_PRESERVE))
        latents = backend.encode_images(images).detach()
        times = []
        for _ in range(steps + 1):
            if variant == "weighted-reencode":
                latents = backend.encode_images(images)
            x0, noise, t, x_t = noisy_batch(latents, backend.schedule, 2, generator)
            prediction = backend.predict(x_t, t, encode(backend, [CONCEPT] * 2))
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


def weighted_table(opts: dict) -> None:
    rows = [_child(v, opts) for v in WEIGHTED]
    base = rows[0]
    print(f"\nweighted erase step, SD2 {opts['size']} shapes, batch 2, {opts['steps']} timed steps")
    print("| variant | s/step | x engine | peak RSS MB |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['per_step']:.2f} | {row['per_step'] / base['per_step']:.2f} | "
              f"{row['peak_rss_mb']} |")


if __name__ == "__main__":
    main()
