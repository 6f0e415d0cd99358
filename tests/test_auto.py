"""Auto classes, the built-in `diffllama` living side by side with ours, and remote code."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)
from transformers import DiffLlamaConfig as BuiltinDiffLlamaConfig
from transformers.models.diffllama import modeling_diffllama as builtin

import configuration_diff
import modeling_diff
from conftest import ROOT, tiny_config

AUTO_CLASSES = {
    AutoModel: modeling_diff.DiffLlamaModel,
    AutoModelForCausalLM: modeling_diff.DiffLlamaForCausalLM,
    AutoModelForSequenceClassification: modeling_diff.DiffLlamaForSequenceClassification,
    AutoModelForTokenClassification: modeling_diff.DiffLlamaForTokenClassification,
    AutoModelForQuestionAnswering: modeling_diff.DiffLlamaForQuestionAnswering,
}


@pytest.mark.parametrize("auto_class", AUTO_CLASSES, ids=lambda c: c.__name__)
def test_from_config_gives_our_class(auto_class):
    assert type(auto_class.from_config(tiny_config())) is AUTO_CLASSES[auto_class]


@pytest.mark.parametrize("auto_class", AUTO_CLASSES, ids=lambda c: c.__name__)
def test_every_auto_class_loads_a_saved_causal_lm(tmp_path, auto_class):
    modeling_diff.DiffLlamaForCausalLM(tiny_config()).save_pretrained(tmp_path)
    assert type(auto_class.from_pretrained(tmp_path)) is AUTO_CLASSES[auto_class]


def test_save_writes_every_auto_class_and_the_code_files(tmp_path):
    modeling_diff.DiffLlamaForCausalLM(tiny_config()).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "diff_llama"
    assert set(config["auto_map"]) == {"AutoConfig", *(c.__name__ for c in AUTO_CLASSES)}
    for name in ("configuration_diff.py", "modeling_diff.py", "chunked_attention.py"):
        assert (tmp_path / name).read_bytes() == (ROOT / name).read_bytes(), f"{name} differs from the package"
    assert AutoConfig.from_pretrained(tmp_path).__class__ is configuration_diff.DiffLlamaConfig


def test_sequence_classification_head_runs():
    model = modeling_diff.DiffLlamaForSequenceClassification(tiny_config(num_labels=3)).eval()
    ids = torch.randint(1, 128, (2, 7))
    assert model(ids).logits.shape == (2, 3)


def test_builtin_diffllama_still_loads_its_own_class(tmp_path):
    config = BuiltinDiffLlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    )
    model = AutoModelForCausalLM.from_config(config)
    assert type(model) is builtin.DiffLlamaForCausalLM
    model.save_pretrained(tmp_path)
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path)) is builtin.DiffLlamaForCausalLM
    assert type(AutoConfig.from_pretrained(tmp_path)) is BuiltinDiffLlamaConfig


def class_by_saved_name(folder, **kwargs):
    """How TRL's trainers (`create_model_from_path`), `transformers serve` and vLLM pick a model class: the name in
    `architectures` looked up in transformers, and (TRL, vLLM's Transformers backend) `auto_map` where it has none."""
    import transformers

    config = AutoConfig.from_pretrained(folder, **kwargs)
    return getattr(transformers, config.architectures[0], None) or AutoModelForCausalLM


@pytest.mark.parametrize("auto_class", AUTO_CLASSES, ids=lambda c: c.__name__)
def test_saved_class_names_are_not_transformers_own(tmp_path, auto_class):
    import transformers

    ours = AUTO_CLASSES[auto_class]
    ours(tiny_config(diff_version=2)).save_pretrained(tmp_path)
    (name,) = json.loads((tmp_path / "config.json").read_text())["architectures"]
    assert name == configuration_diff.SAVED_ARCHITECTURES[ours.__name__] == ours.__name__.replace("Diff", "Differential")
    assert not hasattr(transformers, name)  # so no tool that trusts the name gets the built-in model
    assert ours.__name__ in dir(transformers)  # the name it replaces is the built-in's


def test_tools_that_pick_the_class_by_its_saved_name_get_ours(tmp_path):
    model = modeling_diff.DiffLlamaForCausalLM(tiny_config(diff_version=1)).eval()
    model.save_pretrained(tmp_path / "ours")
    assert type(class_by_saved_name(tmp_path / "ours").from_pretrained(tmp_path / "ours")) is type(model)
    # the built-in's folders still name, and load as, the built-in
    builtin_config = BuiltinDiffLlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4)
    builtin.DiffLlamaForCausalLM(builtin_config).save_pretrained(tmp_path / "builtin")
    loaded = class_by_saved_name(tmp_path / "builtin").from_pretrained(tmp_path / "builtin")
    assert type(loaded) is builtin.DiffLlamaForCausalLM


def test_a_folder_saved_with_the_old_name_loads_unchanged_and_resaves_with_the_new(tmp_path):
    model = modeling_diff.DiffLlamaForCausalLM(tiny_config(diff_version=2)).eval()
    model.save_pretrained(tmp_path / "old")
    config_file = tmp_path / "old" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "architectures": ["DiffLlamaForCausalLM"]}))  # as saved before
    ids = torch.randint(1, 128, (1, 7))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "old").eval()
    assert type(reloaded) is modeling_diff.DiffLlamaForCausalLM
    assert torch.equal(reloaded(ids).logits, model(ids).logits)
    reloaded.save_pretrained(tmp_path / "new")
    assert json.loads((tmp_path / "new" / "config.json").read_text())["architectures"] == ["DifferentialLlamaForCausalLM"]


def _run_isolated(code: str, tmp_path: Path, block_package: bool, stdin: str = "") -> str:
    """Run `code` in a fresh interpreter whose sys.path does not reach this checkout."""
    prelude = "import sys\n"
    if block_package:
        # A clean sys.path, and a None entry in sys.modules, which makes any import of these names fail.
        prelude += (
            f"sys.path[:] = [p for p in sys.path if p not in ('', {str(ROOT)!r})]\n"
            "sys.modules['configuration_diff'] = sys.modules['modeling_diff'] = sys.modules['conversion'] = None\n"
            "sys.modules['chunked_attention'] = None\n"
        )
    else:
        prelude += f"sys.path.insert(0, {str(ROOT)!r})\n"
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
        input=stdin,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Do you wish to run the custom code?" not in result.stdout + result.stderr, "transformers asked"
    return result.stdout


@pytest.mark.parametrize("version", [1, 2])
def test_remote_code_loads_without_this_package(tmp_path, version):
    model = modeling_diff.DiffLlamaForCausalLM(tiny_config(diff_version=version)).eval()
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    ids = torch.randint(1, 128, (2, 9))
    torch.save({"ids": ids, "logits": model(ids).logits.detach()}, tmp_path / "expected.pt")
    out = _run_isolated(
        f"""
        import torch
        from transformers import AutoModel, AutoModelForCausalLM
        expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        assert type(model).__name__ == "DiffLlamaForCausalLM"
        assert torch.equal(model(expected["ids"]).logits, expected["logits"])
        # TRL's lookup: the saved name is not transformers', so it falls back to auto_map, our remote code
        import transformers
        from transformers import AutoConfig
        saved = AutoConfig.from_pretrained({str(folder)!r}, trust_remote_code=True).architectures[0]
        assert saved == "DifferentialLlamaForCausalLM" and getattr(transformers, saved, None) is None
        # the snapshot carries the chunked CPU path: inference above, and a training step through its backward pass
        chunked = [name for name in sys.modules if name.startswith("transformers_modules.")]
        assert any(name.endswith(".chunked_attention") for name in chunked), chunked
        model.train()
        model(expected["ids"], labels=expected["ids"]).loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        base = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(base).__name__ == "DiffLlamaModel" and type(base).__module__.startswith("transformers_modules.")
        from transformers import AutoConfig, AutoModelForSequenceClassification
        config = AutoConfig.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(config).__module__.startswith("transformers_modules.") and config.model_type == "diff_llama"
        classifier = AutoModelForSequenceClassification.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(classifier).__name__ == "DiffLlamaForSequenceClassification"
        assert type(classifier).__module__.startswith("transformers_modules.")
        assert torch.equal(classifier.model.embed_tokens.weight, model.model.embed_tokens.weight)
        print("remote ok")
        """,
        tmp_path,
        block_package=True,
    )
    assert "remote ok" in out


def test_remote_config_then_from_config_never_gives_the_builtin_model(tmp_path):
    folder = tmp_path / "checkpoint"
    modeling_diff.DiffLlamaForCausalLM(tiny_config()).save_pretrained(folder)
    out = _run_isolated(
        f"""
        from transformers import AutoConfig, AutoModelForCausalLM
        config = AutoConfig.from_pretrained({str(folder)!r}, trust_remote_code=True)
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
        print(type(model).__module__)
        """,
        tmp_path,
        block_package=True,
    )
    assert out.strip().startswith("transformers_modules.")


@pytest.mark.parametrize("first_import", ["configuration_diff", "modeling_diff"])
def test_no_import_order_hands_out_the_builtin_model(tmp_path, first_import):
    out = _run_isolated(
        f"""
        import {first_import}
        from configuration_diff import DiffLlamaConfig
        from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
        config = DiffLlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2)
        for auto_class in (AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification):
            print(type(auto_class.from_config(config)).__module__)
        """,
        tmp_path,
        block_package=False,
    )
    assert out.split() == ["modeling_diff"] * 3


def test_importing_the_model_code_does_no_io_and_no_network(tmp_path):
    out = _run_isolated(
        """
        import builtins, os, socket
        import torch, transformers
        from transformers import LlamaForCausalLM  # transformers' own lazy imports are not ours to police
        calls = []
        def refuse(name):
            def call(*args, **kwargs):
                calls.append((name, args[:1]))
                raise RuntimeError(f"{name} during import")
            return call
        real_open = builtins.open
        builtins.open = refuse("open")
        os.open = refuse("os.open")
        socket.socket.connect = refuse("connect")
        socket.create_connection = refuse("create_connection")
        import configuration_diff, modeling_diff
        builtins.open = real_open
        print("calls", calls)
        """,
        tmp_path,
        block_package=False,
    )
    assert "calls []" in out


def test_model_card_snippet_runs_as_written_without_this_package(tmp_path):
    from conversion import convert
    from test_conversion import make_source

    make_source(tmp_path / "llama", "llama")
    out = convert(source=tmp_path / "llama", output=tmp_path / "out", verify=False, progress=False)
    card = (out / "README.md").read_text()
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    snippet = snippet.replace('"OWNER/NAME"', repr(str(out))).replace('"COMMIT_SHA"', "None")
    snippet += "ids = tokenizer('def f():', return_tensors='pt').input_ids\n"
    snippet += "print(type(model).__module__, model(ids).logits.shape)\n"
    printed = _run_isolated(snippet, tmp_path, block_package=True, stdin="y\n")  # "y" would answer a prompt
    assert printed.startswith("transformers_modules.") and "custom code" not in printed
