"""What the library will not do: run strings as code, unpickle without `weights_only`, run a checkpoint's code."""

import ast
import json
import subprocess
import sys

import pytest

from conftest import ROOT, TINY
from test_trainer import VOCAB, data_dir, tokenizer, train  # noqa: F401  (fixtures)

LIBRARY = [ROOT / "configuration_diff.py", ROOT / "modeling_diff.py"]
LIBRARY += [path for package in ("conversion", "finetune", "vllm_diffllama") for path in sorted((ROOT / package).rglob("*.py"))]


def _calls(path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            yield node


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_eval_exec_or_unsafe_unpickling(path):
    for call in _calls(path):
        name = ast.unparse(call.func)
        assert name not in ("eval", "exec", "compile", "pickle.load", "pickle.loads"), f"{path}:{call.lineno} {name}"
        if name.endswith("torch.load") or name == "load" and "torch" in path.read_text():
            kwargs = {k.arg: ast.unparse(k.value) for k in call.keywords}
            assert kwargs.get("weights_only") == "True", f"{path}:{call.lineno} torch.load without weights_only=True"
        for keyword in call.keywords:
            if keyword.arg == "trust_remote_code":
                value = ast.unparse(keyword.value)
                assert value != "True", f"{path}:{call.lineno} trusts remote code unconditionally"
            if keyword.arg == "safe_serialization":
                assert ast.unparse(keyword.value) != "False", f"{path}:{call.lineno} writes pickled weights"


def _booby_trapped_checkpoint(folder, marker, tokenizer):
    """A Llama checkpoint whose auto_map points at code that leaves a marker file when it runs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(**{**TINY, "vocab_size": VOCAB, "eos_token_id": 0})).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    pass\n"
        "class EvilForCausalLM(LlamaForCausalLM):\n    pass\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))


def test_finetune_never_runs_a_checkpoints_own_code(tmp_path, data_dir, tokenizer, caplog):
    folder, marker = tmp_path / "trap", tmp_path / "marker"
    _booby_trapped_checkpoint(folder, marker, tokenizer)
    caplog.set_level("WARNING", logger="finetune")
    metrics = train(folder, tmp_path / "out", data_dir, steps=2)
    assert not marker.exists(), "the checkpoint's auto_map code ran"
    assert metrics["loss_curve"], "the plain Llama trained instead"
    assert "names its own code (AutoConfig -> evil.EvilConfig" in caplog.text and "it was not run" in caplog.text


def test_conversion_never_runs_or_asks_about_a_sources_own_code(tmp_path):
    from test_conversion import make_source

    folder, marker = tmp_path / "trap", tmp_path / "marker"
    make_source(folder, "llama")
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    for name, auto_map in (
        ("config.json", {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"}),
        ("tokenizer_config.json", {"AutoTokenizer": ["evil.EvilTokenizer", None]}),
    ):
        config = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps({**config, "auto_map": auto_map}))
    # A "y" waiting on standard input would answer transformers' "Do you wish to run the custom code?" prompt.
    child = subprocess.run(
        [sys.executable, "-m", "conversion", str(folder), str(tmp_path / "out"), "--no-progress"],
        input="y\ny\ny\n", capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert child.returncode == 0, child.stderr
    assert not marker.exists(), "the source's auto_map code ran"
    assert "custom code" not in child.stdout + child.stderr.replace("custom_code", "")  # never asked
    assert "names its own code (config.json: AutoConfig -> evil.EvilConfig" in child.stderr
    assert "it was not run" in (tmp_path / "out" / "README.md").read_text()
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["auto_map"]
    assert all(target.startswith(("configuration_diff.", "modeling_diff.")) for target in saved.values())


def test_merged_model_carries_no_foreign_auto_map(tmp_path, data_dir, tokenizer):
    folder, marker = tmp_path / "trap", tmp_path / "marker"
    _booby_trapped_checkpoint(folder, marker, tokenizer)
    train(folder, tmp_path / "out", data_dir, steps=1, mode="lora", merge=True)
    merged = json.loads((tmp_path / "out" / "merged" / "config.json").read_text())
    assert "auto_map" not in merged and not (tmp_path / "out" / "merged" / "evil.py").exists()
    assert not marker.exists()
