import pytest

from unlearn_core.config import EraseConfig, LoraConfig, TokenConfig
from unlearn_core.targets import ATTENTION, Target, resolve_targets


def test_fewshot_preset_is_mlp_of_every_layer_and_attention_of_the_last():
    targets = resolve_targets("fewshot", num_layers=23)
    assert {t for t in targets if t.proj in ("fc1", "fc2")} == {Target(n, p) for n in range(23) for p in ("fc1", "fc2")}
    assert {t for t in targets if t.proj in ATTENTION} == {Target(22, p) for p in ATTENTION}


def test_final_preset_takes_every_projection_of_the_last_k_layers():
    targets = resolve_targets("final", num_layers=23, last_k=2)
    assert {t.layer for t in targets} == {21, 22} and len(targets) == 12


def test_explicit_attention_target_is_completed_to_q_k_v_out():
    assert resolve_targets("fewshot", 23, explicit=["5.q", "7.fc2"]) == sorted(
        [Target(5, p) for p in ATTENTION] + [Target(7, "fc2")])


def test_kohya_names_round_trip():
    for proj in ("q", "k", "v", "out", "fc1", "fc2"):
        target = Target(22, proj)
        assert Target.from_kohya(target.kohya_name) == target
    assert Target(3, "out").kohya_name == "lora_te_text_model_encoder_layers_3_self_attn_out_proj"


def test_target_outside_the_conditioning_layers_is_refused():
    with pytest.raises(ValueError, match="outside the text encoder's conditioning layers 0..22"):
        resolve_targets("fewshot", 23, explicit=["23.fc1"])


@pytest.mark.parametrize("make, field", [
    (lambda: EraseConfig(concept="  "), "concept"),
    (lambda: EraseConfig(concept="a cat", steps=0), "steps"),
    (lambda: EraseConfig(concept="a cat", method="magic"), "method"),
    (lambda: LoraConfig(rank=0), "rank"),
    (lambda: LoraConfig(compress_rank=4), "compress_rank"),
    (lambda: TokenConfig(token="has space"), "token"),
    (lambda: TokenConfig(token="<t>", lr=-1), "lr"),
    (lambda: TokenConfig(token="<t>", captions=("a photo of it",)), "captions"),
    (lambda: EraseConfig(concept="a cat", gradient_surgery=True, preserve_weight=0), "gradient_surgery"),
    (lambda: EraseConfig.fewshot_paper("a cat", gradient_surgery=True), "gradient_surgery"),
])
def test_config_errors_name_the_field(make, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        make()


def test_paper_preset_matches_the_published_settings():
    config = EraseConfig.fewshot_paper("a cat")
    assert (config.method, config.steps, config.lr, config.betas, config.batch_size) == ("fewshot", 10, 1e-5, (0.9, 0.98), 2)
    assert config.lora.mode == "full" and config.lora.preset == "fewshot"


def test_first_preset_is_the_mlp_of_the_first_layer_only():
    assert resolve_targets("first", 23) == [Target(0, "fc1"), Target(0, "fc2")]
    assert resolve_targets("first", 4) == resolve_targets("first", 24)  # any depth: the first layer
