"""The contextual method's fast paths (issue 14): token ids made once per prompt, frozen lower layers run once per
prompt when the deltas sit on upper layers only; each gives what the plain path gives."""
import pytest
import torch

from bench.speed import reference_erase
from unlearn_core import objectives
from unlearn_core.config import EraseConfig, LoraConfig
from unlearn_core.erase import _new_deltas, erase
from unlearn_core.prompt_cache import PromptEncoder
from unlearn_core.tokens import ConceptToken
from unlearn_core.train import training_context

CONTEXTS = ("a {} on a table", "a big {} in a room", "a small {} on grass")
PROMPTS = ["a red square on a table", "a big red square in a room", "a green circle on a table", ""]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _flat(deltas) -> torch.Tensor:
    return torch.cat([v.flatten() for v in deltas.state_dict().values()])


def _final_config(**settings) -> EraseConfig:
    settings = dict(steps=15, lr=1e-2, max_contexts=6) | settings
    return EraseConfig(concept="red square", method="contextual", contexts=CONTEXTS, keep=("green circle",),
                       lora=LoraConfig(preset="final", last_k=2), **settings)


def _trained_deltas(backend, config):
    """Deltas with non-zero values everywhere (a LoRA starts with up = 0, which would hide a wrong path)."""
    deltas = _new_deltas(backend, config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in deltas.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return deltas


@pytest.mark.parametrize("last_k", [1, 3])
def test_cached_and_uncached_paths_give_the_same_loss_and_gradient(backend, last_k):
    config = EraseConfig(concept="red square", method="contextual", lora=LoraConfig(preset="final", last_k=last_k))
    deltas = _trained_deltas(backend, config)
    token = ConceptToken("<sq>", torch.randn(2, backend.width, generator=torch.Generator().manual_seed(2)))
    prompts = PROMPTS + ["a <sq> on a table"]
    tokens = [None] * len(PROMPTS) + [token]
    results = []
    for cache in (("ids", "layers"), ()):
        encoder = PromptEncoder(backend, min(t.layer for t in deltas.targets), cache)
        with training_context(backend), deltas.inject(backend.linear):
            with torch.no_grad(), deltas.off():
                encoder.frozen(PROMPTS)
                encoder.frozen(prompts[-1:], token)
                target = encoder.frozen(["a photo"] * len(prompts), remember=False)
                encoder.check()
            assert (encoder.start is not None) == bool(cache) and not encoder.notes
            cond = encoder(prompts, tokens)
            loss = objectives.conditioning_match(cond, target, target.pow(2).mean())
            grads = torch.autograd.grad(loss, list(deltas.parameters()))
        results.append((float(loss), torch.cat([g.flatten() for g in grads])))
    (cached_loss, cached_grad), (plain_loss, plain_grad) = results
    assert cached_loss == pytest.approx(plain_loss, rel=1e-5)
    assert _relative(cached_grad, plain_grad) < 1e-4


def test_fast_path_gives_the_same_adapter_as_the_plain_path(backend):
    config = _final_config(synonyms=("crimson square",))
    fast, plain = erase(backend, config), erase(backend, config, cache=())
    assert not any("cache off" in note for note in fast.notes)
    assert _relative(_flat(fast.deltas), _flat(plain.deltas)) < 1e-4
    assert float(_flat(fast.deltas).norm()) > 0
    for a, b in zip(fast.history, plain.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_fast_path_with_a_concept_token_gives_the_same_adapter(backend):
    token = ConceptToken("<sq>", torch.randn(2, backend.width, generator=torch.Generator().manual_seed(3)))
    config = _final_config(steps=8)
    fast, plain = erase(backend, config, token=token), erase(backend, config, token=token, cache=())
    assert _relative(_flat(fast.deltas), _flat(plain.deltas)) < 1e-4


def test_lower_layers_run_once_per_prompt_and_prompts_are_tokenized_once(backend, monkeypatch):
    config = _final_config(steps=10)
    layers = backend._text_stages()[0]
    counted = {"rows": 0, "tokenized": 0}
    handle = layers[0].register_forward_hook(lambda _m, args, _o: counted.__setitem__(
        "rows", counted["rows"] + args[0].shape[0]))
    tokenize = backend.tokenize
    monkeypatch.setattr(backend, "tokenize", lambda prompts: counted.__setitem__(
        "tokenized", counted["tokenized"] + len(prompts)) or tokenize(prompts))
    try:
        seen = {}
        for cache in (("ids", "layers"), ()):
            counted.update(rows=0, tokenized=0)
            erase(backend, config, cache=cache)
            seen[cache] = dict(counted)
    finally:
        handle.remove()
    fast, plain = seen[("ids", "layers")], seen[()]
    # the frozen setup passes (targets, kept conditionings, the check) reach layer 0; no training pass does
    setup_rows = fast["rows"]
    assert plain["rows"] >= setup_rows + config.steps * (2 * 3 + 1)  # each plain step sends its batch through
    distinct = 6 * 2 + 6  # at most: erase + anchor prompts (6 contexts), keep prompts + preserve prompts
    assert fast["tokenized"] <= distinct + 6 + 1
    assert plain["tokenized"] >= fast["tokenized"] + config.steps * 7


def test_default_preset_starts_at_layer_zero_and_gives_the_plain_result(backend):
    config = EraseConfig(concept="red square", method="contextual", contexts=CONTEXTS, steps=6, max_contexts=4)
    fast, plain = erase(backend, config), erase(backend, config, cache=())
    assert torch.equal(_flat(fast.deltas), _flat(plain.deltas))  # same ids, same passes: bit for bit


def test_reference_loop_is_the_same_algorithm_as_the_engine(backend):
    """bench/speed.py's straightforward reference (targets re-encoded each step) learns the engine's adapter."""
    for config in (_final_config(steps=10), EraseConfig(concept="red square", method="contextual", anchor="a shape",
                                                         contexts=CONTEXTS, steps=10, lr=1e-2, max_contexts=4)):
        job = erase(backend, config)
        deltas, history = reference_erase(backend, config)
        assert _relative(_flat(deltas), _flat(job.deltas)) < 1e-3
        assert history[-1]["loss"] == pytest.approx(job.history[-1]["loss"], rel=1e-3)


def test_unknown_cache_entries_are_refused(backend):
    with pytest.raises(ValueError, match="cache"):
        PromptEncoder(backend, 2, ("ids", "everything"))
