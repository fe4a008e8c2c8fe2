"""Strict config validation: unknown keys, wrong types, out-of-range values, overrides."""

import pytest

from sparse_dit.config import ConfigError, DiffusionConfig, ModelConfig, RecipeConfig
from sparse_dit.presets import load_recipe
from sparse_dit.schema import apply_overrides, from_dict, to_dict


def test_unknown_key_names_key_and_lists_allowed():
    with pytest.raises(ConfigError) as e:
        from_dict(RecipeConfig, {"model": {"hidden_sise": 64}})
    msg = str(e.value)
    assert "model.hidden_sise" in msg and "hidden_size" in msg and "num_heads" in msg


def test_wrong_type_names_field_value_and_type():
    with pytest.raises(ConfigError) as e:
        from_dict(RecipeConfig, {"train": {"max_steps": "ten"}})
    msg = str(e.value)
    assert "train.max_steps" in msg and "'ten'" in msg and "int" in msg
    with pytest.raises(ConfigError):
        from_dict(ModelConfig, {"qk_norm": 1})  # an int is not a bool
    with pytest.raises(ConfigError):
        from_dict(ModelConfig, {"depth": True})  # a bool is not an int


def test_out_of_range_and_choices():
    with pytest.raises(ConfigError) as e:
        from_dict(RecipeConfig, {"diffusion": {"cond_dropout": 1.5}})
    assert "diffusion.cond_dropout" in str(e.value) and "<= 1" in str(e.value)
    with pytest.raises(ConfigError) as e:
        from_dict(RecipeConfig, {"parallel": {"zero_stage": 4}})
    assert "parallel.zero_stage=4" in str(e.value) and "[0, 1, 2, 3]" in str(e.value)
    with pytest.raises(ConfigError) as e:
        DiffusionConfig(sampler="ddim")
    assert "sampler" in str(e.value) and "heun" in str(e.value)


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="divisible by model.num_heads"):
        ModelConfig(hidden_size=64, num_heads=5)
    with pytest.raises(ConfigError, match="text_dim"):
        ModelConfig(cross_attention=True, text_dim=0)
    with pytest.raises(ConfigError, match="top_k"):
        from_dict(ModelConfig, {"moe": {"num_experts": 2, "top_k": 3}})


def test_int_to_float_and_list_to_tuple_coercion():
    cfg = from_dict(RecipeConfig, {"train": {"lr": 1, "betas": [0.9, 0.95]}, "model": {"patch_size": [1, 2, 2]}})
    assert isinstance(cfg.train.lr, float) and cfg.train.betas == (0.9, 0.95)
    assert cfg.model.patch_size == (1, 2, 2)


def test_overrides_parse_yaml_values_and_roundtrip(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("preset: debug\nmodel:\n  depth: 3\ntrain:\n  max_steps: 5\n")
    cfg = load_recipe(path, ["train.max_steps=7", "parallel.ep_size=2", "model.moe.num_experts=4", "output_dir=/tmp/x"])
    assert cfg.train.max_steps == 7 and cfg.parallel.ep_size == 2 and cfg.output_dir == "/tmp/x"
    assert cfg.model.depth == 3 and cfg.model.hidden_size == 64  # preset filled, YAML overrides
    assert cfg.model.moe.num_experts == 4
    again = from_dict(RecipeConfig, to_dict(cfg))
    assert again == cfg
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["train.max_steps"])
    with pytest.raises(ConfigError, match="unknown key 'train.max_step'"):
        load_recipe(path, ["train.max_step=3"])


def test_yaml_11_exponent_without_dot_is_accepted_as_float(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  lr: 3e-3\n")  # PyYAML reads this as the string '3e-3'
    assert load_recipe(path).train.lr == 3e-3
    with pytest.raises(ConfigError, match="train.lr='fast'"):
        load_recipe(path, ["train.lr=fast"])


def test_train_compile_with_zero3_is_one_line():
    from sparse_dit.config import ConfigError
    from sparse_dit.presets import load_recipe

    from _launch import TINY_DENSE

    assert load_recipe(TINY_DENSE, ["train.compile=true", "parallel.zero_stage=2"]).train.compile
    with pytest.raises(ConfigError) as info:
        load_recipe(TINY_DENSE, ["train.compile=true", "parallel.zero_stage=3"])
    assert "train.compile=true with parallel.zero_stage=3" in str(info.value) and "\n" not in str(info.value)
