import json

import pytest

from configuration_diff import AUTO_MAP, DiffLlamaConfig, paper_lambda_init
from conftest import tiny_config


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(num_attention_heads=9, num_key_value_heads=2), r"num_attention_heads \(9\).*num_key_value_heads \(2\)"),
        (dict(lambda_init=[0.1, 0.2, 0.3]), r"lambda_init has 3 values but num_hidden_layers is 2"),
        (dict(lambda_init=1.2), r"lambda_init for layer 0 is 1.2.*\[0, 1\)"),
        (dict(lambda_init=[0.5, -0.1]), r"lambda_init for layer 1 is -0.1"),
        (dict(attn_implementation="paged_attention"), r"'paged_attention'.*eager, sdpa, flash_attention_2"),
        (dict(attn_implementation="../x"), r"'\.\./x' looks like a Hub kernel .* is not a Hub repository id"),
        (dict(cache_head_dim=32), r"cache_head_dim is 32, but it follows from diff_version \(1\) and head_dim \(8\): 16"),
        (dict(diff_version=3), r"diff_version \(3\) must be 1"),
        (dict(head_dim=7), r"head_dim \(7\) must be a positive even number"),
        (dict(hidden_size=64, num_attention_heads=32, num_key_value_heads=32, head_dim=None), r"head_dim \(1\)"),
        (dict(lambda_std_dev=-1.0), r"lambda_std_dev \(-1.0\) must be a finite number >= 0"),
        (dict(lambda_std_dev=float("inf")), r"lambda_std_dev \(inf\) must be a finite number >= 0"),
        (dict(lambda_std_dev=float("nan")), r"lambda_std_dev \(nan\) must be a finite number >= 0"),
        (dict(lambda_init=float("nan")), r"lambda_init for layer 0 is nan"),
    ],
)
def test_impossible_configs_raise_value_error_naming_fields_and_numbers(fields, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**fields)


def test_a_written_out_cache_head_dim_that_agrees_is_accepted():
    """A config.json holding the derived `cache_head_dim` (some tools write properties out) loads when it agrees."""
    config = tiny_config(cache_head_dim=16)
    assert config.cache_head_dim == 16 and "cache_head_dim" not in config.to_dict()
    assert tiny_config(attn_implementation="kernels-community/flash-attn@main")  # a Hub kernel name passes through


def test_head_dim_defaults_follow_the_version():
    assert DiffLlamaConfig(hidden_size=1024, num_attention_heads=8).head_dim == 64  # paper: H / (2h)
    assert DiffLlamaConfig(hidden_size=1024, num_attention_heads=8, diff_version=2).head_dim == 128  # V2: H / h
    assert DiffLlamaConfig(hidden_size=1024, num_attention_heads=8).num_key_value_heads == 8


def test_lambda_init_forms():
    assert tiny_config().lambda_init_for(3) == pytest.approx(paper_lambda_init(3))
    assert paper_lambda_init(0) == pytest.approx(0.2)
    assert tiny_config(lambda_init=0.5).lambda_init_for(1) == 0.5
    assert tiny_config(lambda_init=[0.1, 0.7]).lambda_init_for(1) == 0.7


def test_model_type_is_our_own():
    assert DiffLlamaConfig.model_type not in ("llama", "diffllama")


def test_json_round_trip_keeps_every_field_and_the_full_auto_map(tmp_path):
    config = tiny_config(diff_version=2, lambda_init=[0.1, 0.2], use_head_norm=False)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"] == AUTO_MAP
    reloaded = DiffLlamaConfig.from_pretrained(tmp_path)
    for field in ("diff_version", "lambda_init", "use_head_norm", "head_dim", "num_key_value_heads"):
        assert getattr(reloaded, field) == getattr(config, field), field


def test_saved_auto_map_entries_with_a_repository_prefix_are_kept():
    prefixed = {"AutoModelForCausalLM": "someone/repo--modeling_diff.DiffLlamaForCausalLM"}
    config = tiny_config(auto_map=prefixed)
    assert config.auto_map["AutoModelForCausalLM"] == prefixed["AutoModelForCausalLM"]
    assert config.auto_map["AutoModel"] == AUTO_MAP["AutoModel"]
