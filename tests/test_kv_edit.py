"""The UNet cross-attention key/value edit (issue 12 item 3b): its closed form, its LoRA, the combined file."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from closeness import effect_error, norm, relative_effect, relative_error
from unlearn_core import kv_edit
from unlearn_core.adapter_io import AdapterFileError, base_fingerprint, inspect, read_adapter, write_adapter
from unlearn_core.config import EraseConfig
from unlearn_core.contexts import build_contexts, fill
from unlearn_core.diffusers_backend import DiffusersBackend, load_pipeline
from unlearn_core.erase import erase
from unlearn_core.lora import Deltas, target_shapes
from unlearn_core.targets import resolve_targets
from unlearn_core.tokens import encode

CONCEPT = "a red square"


def _vectors(seed, d=32):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(24, d, generator=g, dtype=torch.float64)
    concept = torch.randn(3, d, generator=g, dtype=torch.float64)
    target = torch.randn(3, d, generator=g, dtype=torch.float64)
    keep = torch.randn(5, d, generator=g, dtype=torch.float64)
    return weight, concept, target, keep


def test_edit_keeps_preserved_projections_and_maps_the_concept_onto_its_target():
    weight, concept, target, keep = _vectors(0)
    delta = kv_edit.closed_form_delta(weight, concept, target, keep, preserve_weight=1.0, ridge=1e-8)
    edited = weight + delta
    # preserved directions: W' k = W k; the concept's: W' c = W a (independent directions, mu -> 0)
    assert relative_error(keep @ edited.t(), keep @ weight.t()) < 1e-5
    assert effect_error(concept @ edited.t(), target @ weight.t(), concept @ weight.t()) < 1e-5
    # at the default ridge the edit still does most of the mapping and moves the preserved ones little
    delta = kv_edit.closed_form_delta(weight, concept, target, keep)
    assert effect_error(concept @ (weight + delta).t(), target @ weight.t(), concept @ weight.t()) < 0.05
    assert relative_error(keep @ (weight + delta).t(), keep @ weight.t()) < 0.01


def test_the_empty_prompts_weight_holds_its_keys_and_values_against_a_concept_that_overlaps_it():
    """The empty prompt (read by classifier-free guidance for every image) has its own weight in the closed form:
    a concept sharing most of its direction with it moves its keys/values less the higher that weight."""
    weight, concept, target, _ = _vectors(5)
    empty = concept[:1] + 0.1 * torch.randn(1, weight.shape[1], generator=torch.Generator().manual_seed(6),
                                            dtype=torch.float64)
    drift = []
    for empty_weight in (0.0, 10.0, 1000.0):
        stats = kv_edit.Statistics(weight.shape[1])
        stats.add_concept(concept, target)
        stats.add_empty(empty)
        delta = weight @ stats.operator(preserve_weight=1.0, ridge=1e-3, empty_weight=empty_weight)
        drift.append(relative_error(empty @ (weight + delta).t(), empty @ weight.t()))
    assert drift[0] > 0.1  # unweighted, the overlap drags the empty prompt along with the concept
    assert drift[1] < 0.5 * drift[0] and drift[2] < 0.01 * drift[0]


def test_edit_is_zero_when_the_concept_already_equals_its_target():
    weight, concept, _, keep = _vectors(1)
    assert norm(kv_edit.closed_form_delta(weight, concept, concept, keep)) == 0


def test_low_rank_factors_are_exact_within_the_rank_and_report_the_error_beyond():
    weight, concept, target, keep = _vectors(2)
    delta = kv_edit.closed_form_delta(weight, concept, target, keep)  # rank <= 3 concept vectors
    up, down, error = kv_edit.low_rank(delta, rank=4)
    assert relative_error(up @ down, delta) < 1e-10 and error < 1e-10
    up, down, error = kv_edit.low_rank(delta, rank=1)
    assert error == pytest.approx(relative_error(up @ down, delta)) and error > 1e-3


def test_canonical_names_round_trip_through_kohya_keys(backend):
    names = list(backend.cross_attention_kv())
    assert any(n.startswith("down_blocks.") for n in names) and any(n.startswith("mid_block.") for n in names)
    assert any(n.startswith("up_blocks.") for n in names) and len(names) % 2 == 0
    for name in names:
        key = kv_edit.kohya_name(name)
        assert key.startswith("lora_unet_") and "." not in key and kv_edit.name_from_kohya(key) == name
    for bad in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k",
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q",
                "lora_unet_down_blocks_00_attentions_0_transformer_blocks_0_attn2_to_k"):
        with pytest.raises(ValueError):
            kv_edit.name_from_kohya(bad)


def _te_deltas(backend):
    targets = resolve_targets("final", backend.num_layers, 1)
    return Deltas(target_shapes(backend.linear, targets), "lora", 4)


def test_exported_lora_reproduces_the_edit_exactly(backend, tmp_path):
    modules = backend.cross_attention_kv()
    g = torch.Generator().manual_seed(3)
    stats = kv_edit.Statistics(backend.width)
    stats.add_concept(torch.randn(3, backend.width, generator=g), torch.randn(3, backend.width, generator=g))
    stats.add_keep(torch.randn(40, backend.width, generator=g))
    unet = kv_edit.edit(modules, stats, preserve_weight=1.0, ridge=1e-3, rank=4)
    path = write_adapter(tmp_path / "kv.safetensors", _te_deltas(backend), base_fingerprint(backend), {},
                         dtype=torch.float32, unet=unet)
    loaded = read_adapter(path, backend).unet
    operator = stats.operator(1.0, 1e-3)
    assert loaded is not None and sorted(loaded.names) == sorted(modules)
    for name, module in modules.items():
        expected = module.weight.detach().double() @ operator
        assert relative_error(loaded.delta_weight(name), expected) < 1e-5


def _unet_output(pipe, cond):
    g = torch.Generator().manual_seed(5)
    x_t = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        return pipe.unet(x_t, torch.tensor([400]), encoder_hidden_states=cond).sample


def test_combined_file_loads_in_diffusers_and_changes_the_unet_as_the_engine_predicts(sensitive,
                                                                                     sensitive_model_dir, tmp_path):
    pipe, backend = sensitive
    config = EraseConfig(concept=CONCEPT, method="contextual", steps=10, keep=("a blue square", "a red circle"),
                         unet_kv_edit=True, kv_rank=8)
    result = erase(backend, config)
    assert result.unet_deltas is not None and any("key/value edit" in n for n in result.notes)
    path = write_adapter(tmp_path / "combined.safetensors", result.deltas, base_fingerprint(backend), result.info(),
                         dtype=torch.float32, unet=result.unet_deltas)
    adapter = read_adapter(path, backend)
    prompt = "a photo of a red square"
    with torch.no_grad(), adapter.deltas.inject(backend.linear):
        cond = encode(backend, [prompt])
    base = _unet_output(pipe, encode(backend, [prompt]))
    text_only = _unet_output(pipe, cond)
    with kv_edit.applied(adapter.unet, backend):
        engine = _unet_output(pipe, cond)
    assert relative_effect(engine, text_only) > 1e-3, "the UNet edit should change the concept's prediction"

    fresh = load_pipeline(sensitive_model_dir)
    fresh.load_lora_weights(str(path))
    ids = fresh.tokenizer([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        loaded_cond = fresh.text_encoder(ids)[0]
    loaded = _unet_output(fresh, loaded_cond)
    assert effect_error(loaded, engine, base) < 1e-3  # the whole file: text encoder and UNet edit
    assert effect_error(loaded, engine, text_only) < 1e-2  # the UNet part alone is applied as the engine's
    # and the pipeline the engine hooked is unchanged afterwards
    assert relative_error(_unet_output(pipe, cond), text_only) < 1e-6


def test_the_edit_maps_the_concepts_keys_and_values_onto_the_neighbours_and_keeps_the_empty_prompt(sensitive):
    _, backend = sensitive
    neighbour = "a blue square"  # no anchor named and a keep list: the concept's target is the neighbours' mean
    config = EraseConfig(concept=CONCEPT, method="contextual", steps=1, keep=(neighbour,), unet_kv_edit=True,
                         negative_guidance=0.0, kv_rank=backend.width)
    result = erase(backend, config)
    contexts = build_contexts((), "object", config.max_contexts, config.seed)
    with torch.no_grad():
        with result.deltas.inject(backend.linear):
            concept = encode(backend, [fill(c, CONCEPT) for c in contexts]).double()
            kept = encode(backend, [fill(c, neighbour) for c in contexts] + [""]).double()
        target = encode(backend, [fill(c, neighbour) for c in contexts]).double()  # frozen
    # the concept's first position: after <start> and the context's words before the slot
    starts = [int((backend.tokenize([c.split("{}")[0].strip()])[0] == 49407).nonzero()[0]) for c in contexts]
    concept = torch.cat([concept[i, s:] for i, s in enumerate(starts)])
    target = torch.cat([target[i, s:] for i, s in enumerate(starts)])
    before = after = kept_before = kept_change = 0.0
    for name, module in backend.cross_attention_kv().items():
        weight = module.weight.detach().double()
        delta = result.unet_deltas.delta_weight(name).double()
        reference = target @ weight.t()
        before += norm(concept @ weight.t() - reference) ** 2
        after += norm(concept @ (weight + delta).t() - reference) ** 2
        kept_before += norm(kept @ weight.t()) ** 2
        kept_change += norm(kept @ delta.t()) ** 2
    assert (after / before) ** 0.5 < 0.5  # the keys/values the UNet reads for the concept become the neighbour's
    assert (kept_change / kept_before) ** 0.5 < 0.1  # the neighbour and the empty prompt are read as before


def test_a_file_with_unet_keys_of_the_wrong_shape_or_name_is_refused(backend, tmp_path):
    stats = kv_edit.Statistics(backend.width)
    g = torch.Generator().manual_seed(4)
    stats.add_concept(torch.randn(3, backend.width, generator=g), torch.randn(3, backend.width, generator=g))
    unet = kv_edit.edit(backend.cross_attention_kv(), stats, 1.0, 1e-3, 2)
    good = write_adapter(tmp_path / "good.safetensors", _te_deltas(backend), base_fingerprint(backend), {}, unet=unet)
    summary = inspect(good)
    assert summary["kind"] == "erasure adapter"
    assert summary["modules"]["unet_cross_attention_kv"] == len(unet.names)
    assert "unet_kv_edit" in str(summary["metadata"])
    tensors = load_file(str(good))
    key = kv_edit.kohya_name(sorted(unet.names)[0])

    wider = dict(tensors)  # internally consistent, but not this model's shape
    wider[f"{key}.lora_up.weight"] = torch.zeros(tensors[f"{key}.lora_up.weight"].shape[0] + 8, 2, dtype=torch.float16)
    save_file(wider, str(tmp_path / "wider.safetensors"))
    with pytest.raises(AdapterFileError, match="shape"):
        read_adapter(tmp_path / "wider.safetensors", backend)

    renamed = {k.replace("attn2_to_k", "attn1_to_k"): v for k, v in tensors.items()}
    save_file(renamed, str(tmp_path / "attn1.safetensors"))
    with pytest.raises(AdapterFileError, match="cross-attention"):
        read_adapter(tmp_path / "attn1.safetensors", backend)
    assert inspect(tmp_path / "attn1.safetensors")["kind"] == "unusable"

    no_alpha = {k: v for k, v in tensors.items() if k != f"{key}.alpha"}
    save_file(no_alpha, str(tmp_path / "no-alpha.safetensors"))
    with pytest.raises(AdapterFileError, match="alpha"):
        read_adapter(tmp_path / "no-alpha.safetensors", backend)


def test_a_unet_edit_too_large_for_float16_is_not_written(backend, tmp_path):
    modules = backend.cross_attention_kv()
    name = sorted(modules)[0]
    shape = modules[name].weight.shape
    huge = kv_edit.KVDeltas({name: (torch.full((shape[0], 1), 1e5), torch.ones(1, shape[1]))})
    with pytest.raises(AdapterFileError, match="float16"):
        write_adapter(tmp_path / "huge.safetensors", _te_deltas(backend), None, {}, unet=huge)
    assert not (tmp_path / "huge.safetensors").exists()


def test_options_are_validated_and_hosts_without_the_seam_say_so():
    with pytest.raises(ValueError, match="unet_kv_edit"):
        EraseConfig(concept=CONCEPT, method="weighted", unet_kv_edit=True)
    for field, value in (("kv_rank", 0), ("kv_ridge", 0.0), ("kv_preserve_weight", -1.0)):
        with pytest.raises(ValueError, match=field):
            EraseConfig(concept=CONCEPT, method="contextual", unet_kv_edit=True, **{field: value})
    with pytest.raises(kv_edit.UnsupportedOption, match="not available in this host"):
        kv_edit.kv_modules(object())


def test_no_edit_unless_asked(backend):
    result = erase(backend, EraseConfig(concept=CONCEPT, method="contextual", steps=1))
    assert result.unet_deltas is None


def test_unet_key_only_file_is_refused(backend, tmp_path):
    stats = kv_edit.Statistics(backend.width)
    stats.add_concept(torch.ones(1, backend.width), torch.zeros(1, backend.width))
    unet = kv_edit.edit(backend.cross_attention_kv(), stats, 1.0, 1e-3, 1)
    save_file(unet.to_kohya(), str(tmp_path / "unet-only.safetensors"))
    with pytest.raises(AdapterFileError, match="UNet keys only"):
        read_adapter(tmp_path / "unet-only.safetensors", backend)


def test_backend_for_a_loaded_pipeline_is_unchanged_by_the_edit(pipe):
    backend = DiffusersBackend(pipe)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    erase(backend, EraseConfig(concept=CONCEPT, method="contextual", steps=1, unet_kv_edit=True))
    after = pipe.unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not any(m._forward_hooks for m in backend.cross_attention_kv().values())


def test_cli_erase_with_unet_kv_edit_writes_one_file_that_generate_applies(capsys, tiny_model_dir, tmp_path):
    from unlearn_core.cli import main

    adapter = tmp_path / "no-square.safetensors"
    assert main(["erase", "--model", str(tiny_model_dir), "--concept", CONCEPT, "--keep", "a blue square",
                 "--steps", "2", "--unet-kv-edit", "--out", str(adapter)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(adapter)]) == 0
    summary = __import__("json").loads(capsys.readouterr().out)
    assert summary["modules"]["unet_cross_attention_kv"] == len(DiffusersBackend(load_pipeline(tiny_model_dir))
                                                                 .cross_attention_kv())
    assert summary["metadata"]["concept_unlearn.unet_kv_edit"]["rank"] >= 1
    assert main(["generate", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--prompt", CONCEPT,
                 "--sample-steps", "2", "--out", str(tmp_path / "after.png")]) == 0
    assert main(["erase", "--model", str(tiny_model_dir), "--concept", CONCEPT, "--method", "anchor",
                 "--unet-kv-edit", "--out", str(tmp_path / "refused.safetensors")]) == 2
    assert "--unet-kv-edit: only the contextual method" in capsys.readouterr().err
