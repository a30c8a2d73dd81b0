"""A prompt-search attack on an erased model, in the spirit of UnlearnDiffAtk (Zhang et al. 2024): find a few
ordinary vocabulary words that, put where the concept stands in the example images' captions, make the erased
model denoise those images best, then draw with them and let the classifier say whether the concept came back.

The attacker knows what the re-learning (textual-inversion) attack knows: the concept's example images, their
captions and the erased model (text-encoder LoRA hooked, UNet key/value edit applied). Unlike textual inversion
it may only write words: ``n_tokens`` discrete tokens from the text encoder's vocabulary, restricted to plain
word tokens (a whole lower-case alphabetic word that the tokenizer gives back as that one token), minus every
token of the concept's own phrasings (the held-out one included) and every word beginning with the concept's
name, so it cannot simply name the concept.

The search is a greedy coordinate search as in GCG / UnlearnDiffAtk. One fixed batch (example images, noise
and timesteps drawn once from ``seed``) scores every choice, so choices compare fairly. Each iteration:
  1. the gradient of the denoising loss w.r.t. the one-hot token choice of each slot (the gradient at the slot's
     embedding times the embedding table) ranks the allowed words; the ``top_k`` lowest are that slot's candidates;
  2. ``candidates`` choices, each the current one with one random slot set to one of its random candidates,
     are scored by the actual loss;
  3. the best of them replaces the current choice only when its loss is lower (greedy keep-best), so the kept
     loss never increases.
Cost: ``iterations`` x (one forward+backward and one forward of ``candidates`` x ``batch`` samples).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import torch

from unlearn_core import objectives
from unlearn_core.backend import spliced_embeddings
from unlearn_core.inversion import encode_latents
from unlearn_core.tokens import ConceptToken, token_ids
from unlearn_core.train import PassCounter, noisy_batch, training_context

BUDGET = dict(n_tokens=3, iterations=20, candidates=8, top_k=32, batch=16)  # the harness's default search budget
SLOT = "<slot>"  # stands for the searched words in the captions while the search runs
_PLAIN = re.compile(r"[a-z]+")


@dataclass
class SearchResult:
    words: list[str]
    ids: list[int]
    losses: list[float]  # the kept choice's loss: at the start, then after every iteration (non-increasing)
    name_loss: float | None  # the concept's name in the slot, on the same batch and model (a scale for the losses)
    unet_calls: int
    unet_samples: int
    seconds: float
    budget: dict = field(default_factory=dict)


def excluded_ids(tokenizer, phrasings, name: str) -> set[int]:
    """Every token of the concept's phrasings and every plain word beginning with the concept's name."""
    ids = {i for phrase in phrasings for i in tokenizer(phrase.lower(), add_special_tokens=False).input_ids}
    stem = name.lower()
    ids |= {i for token, i in tokenizer.get_vocab().items() if token.endswith("</w>") and token.startswith(stem)}
    return ids


def plain_word_ids(tokenizer, excluded: set[int]) -> torch.Tensor:
    """Ids of whole alphabetic words the tokenizer writes back as exactly that one token, minus ``excluded``."""
    words = {token[:-4]: i for token, i in tokenizer.get_vocab().items()
             if token.endswith("</w>") and _PLAIN.fullmatch(token[:-4]) and i not in excluded}
    names = sorted(words)
    encoded = tokenizer(names, add_special_tokens=False).input_ids
    return torch.tensor(sorted(words[w] for w, ids in zip(names, encoded) if ids == [words[w]]), dtype=torch.long)


def word(tokenizer, token_id: int) -> str:
    return tokenizer.convert_ids_to_tokens(int(token_id))[:-len("</w>")]


def random_words(tokenizer, phrasings, name: str, n_tokens: int, count: int, seed: int) -> list[str]:
    """``count`` phrases of ``n_tokens`` words drawn at random from the words the search may write: the attack's
    floor, how often such words draw the concept with no search at all (a colour the world draws unasked, a word
    near the concept)."""
    allowed = plain_word_ids(tokenizer, excluded_ids(tokenizer, phrasings, name))
    picks = allowed[torch.randint(len(allowed), (count, n_tokens), generator=torch.Generator().manual_seed(seed))]
    return [" ".join(word(tokenizer, i) for i in row) for row in picks]


def search(backend, tokenizer, images: torch.Tensor, captions: tuple[str, ...], phrasings, name: str,
           n_tokens: int = BUDGET["n_tokens"], iterations: int = BUDGET["iterations"],
           candidates: int = BUDGET["candidates"], top_k: int = BUDGET["top_k"], batch: int = BUDGET["batch"],
           seed: int = 0, log=lambda message: None) -> SearchResult:
    """Greedy coordinate search for ``n_tokens`` words in the captions' "{}" slot minimising the denoising loss of
    the model as ``backend`` has it now (hook the erasure first); ``phrasings`` and ``name`` (the concept's name as
    it stands in the slot) are excluded. See the module doc."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    allowed = plain_word_ids(tokenizer, excluded_ids(tokenizer, phrasings, name))
    if len(allowed) < n_tokens:
        raise ValueError("the vocabulary has too few plain words for the search")
    table = backend.token_embedding().weight
    embedding = backend.token_embedding()
    counter = PassCounter(backend)
    with training_context(backend):
        latents = encode_latents(backend, images)
        index = torch.arange(batch) % len(latents)
        x0, noise, t, x_t = noisy_batch(latents, backend.schedule, batch, generator, index)
        target = backend.schedule.target(x0, noise, t)
        prompts = [captions[i].format(SLOT) for i in index.tolist()]
        ids, mask = token_ids(backend, prompts, ConceptToken(SLOT, torch.zeros(n_tokens, table.shape[1])))
        if mask is None or not bool((mask.sum(dim=1) == n_tokens).all()):
            raise ValueError("every caption must hold the concept's slot \"{}\" exactly once")
        ids, mask = ids.to(backend.device), mask.to(backend.device)

        def with_choices(choices: torch.Tensor) -> torch.Tensor:
            """Token ids [C * batch, L] of the captions with each choice [C, n_tokens] in the slot."""
            filled = ids.repeat(len(choices), 1)
            filled[mask.repeat(len(choices), 1)] = choices.to(ids.device).repeat_interleave(batch, dim=0).flatten()
            return filled

        def losses(filled: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                count = len(filled) // batch
                prediction = counter(x_t.repeat(count, 1, 1, 1), t.repeat(count), backend.encode_ids(filled))
                error = (prediction.float() - target.float().repeat(count, 1, 1, 1)).pow(2)
                return error.view(count, -1).mean(dim=1).cpu()

        current = allowed[torch.randint(0, len(allowed), (n_tokens,), generator=generator)]
        history = [float(losses(with_choices(current[None]))[0])]
        name_ids = backend.tokenize([captions[i].format(name) for i in index.tolist()]).to(backend.device)
        name_loss = float(losses(name_ids)[0])
        forbidden = torch.ones(table.shape[0], dtype=torch.bool)
        forbidden[allowed] = False
        for step in range(iterations):
            vectors = table[current.to(table.device)].detach().float().requires_grad_(True)
            with spliced_embeddings(embedding, mask, vectors):
                prediction = counter(x_t, t, backend.encode_ids(ids))
            loss = objectives.denoise(prediction, target)
            (gradient,) = torch.autograd.grad(loss, vectors)
            scores = (gradient @ table.detach().float().T).cpu()  # [n_tokens, vocab]: first-order change of the loss
            scores[:, forbidden] = float("inf")
            scores[torch.arange(n_tokens), current] = float("inf")
            top = scores.topk(min(top_k, len(allowed) - 1), dim=1, largest=False).indices
            slots = torch.randint(0, n_tokens, (candidates,), generator=generator)
            picks = torch.randint(0, top.shape[1], (candidates,), generator=generator)
            trials = current.repeat(candidates, 1)
            trials[torch.arange(candidates), slots] = top[slots, picks]
            trial_losses = losses(with_choices(trials))
            best = int(trial_losses.argmin())
            if float(trial_losses[best]) < history[-1]:
                current = trials[best].clone()
                history.append(float(trial_losses[best]))
            else:
                history.append(history[-1])
            log(f"prompt search {step + 1}/{iterations}: loss {history[-1]:.4f} "
                f"{' '.join(word(tokenizer, i) for i in current)}")
    return SearchResult([word(tokenizer, i) for i in current], [int(i) for i in current], history, name_loss,
                        counter.calls, counter.samples, time.perf_counter() - start,
                        dict(n_tokens=n_tokens, iterations=iterations, candidates=candidates, top_k=top_k,
                             batch=batch, seed=seed))
