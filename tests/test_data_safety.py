"""Nothing the user did not ask to delete is deleted: the source, the current folder, a folder the tools did not
write, an old output whose replacement was interrupted, a model folder given to `finetune` as its output."""

import json
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import ROOT

from conversion import ConversionError, convert
from conversion import output as outputs
from conversion import sources
from conversion.__main__ import main
from finetune import finetune
from test_bad_input import snapshot
from test_conversion import make_source


@pytest.fixture
def llama(tmp_path):
    folder = tmp_path / "models" / "llama"
    make_source(folder, "llama")
    return folder


def dead_pid() -> int:
    """The id of a process that has exited (not reused so soon)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def convert_quietly(**options):
    return convert(verify=False, progress=False, **options)


def test_output_that_is_the_source_is_refused(tmp_path, llama, capsys):
    before = snapshot(tmp_path)
    assert main([str(llama), str(llama), "--overwrite", "--no-verify"]) == 1
    assert "is the source itself" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["parent", "current folder", "inside"])
def test_output_around_or_inside_the_source_is_refused(tmp_path, llama, monkeypatch, where):
    (tmp_path / "models" / "notes.txt").write_text("a user's file")
    monkeypatch.chdir(tmp_path / "models")
    output, message = {
        "parent": (tmp_path / "models", "contains the source"),
        "current folder": (Path("."), "contains the source"),
        "inside": (llama / "diff", "lies inside the source folder"),
    }[where]
    before = snapshot(tmp_path)
    with pytest.raises(ConversionError, match=message):
        convert_quietly(source=llama, output=output, overwrite=True)
    assert snapshot(tmp_path) == before


def test_current_folder_is_never_the_output(tmp_path, llama, monkeypatch):
    work = tmp_path / "work" / "project"
    work.mkdir(parents=True)
    (work / "mine.py").write_text("print('keep me')")
    monkeypatch.chdir(work)
    for output in (".", tmp_path / "work"):
        with pytest.raises(ConversionError, match="is the current folder or one above it"):
            convert_quietly(source=llama, output=output, overwrite=True)
    assert (work / "mine.py").read_text() == "print('keep me')"


def test_a_folder_the_tool_did_not_write_is_never_replaced(tmp_path, llama):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(ConversionError, match="was not written by this tool.*--overwrite only replaces"):
        convert_quietly(source=llama, output=out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_an_earlier_output_with_files_added_is_not_replaced(tmp_path, llama):
    out = convert_quietly(source=llama, output=tmp_path / "out")
    (out / "eval").mkdir()
    (out / "eval" / "results.json").write_text("{}")
    before = snapshot(out)
    with pytest.raises(ConversionError, match=r"also holds files it did not write \(eval/results.json\)"):
        convert_quietly(source=llama, output=out, overwrite=True)
    assert snapshot(out) == before


def test_an_empty_folder_is_a_fine_output(tmp_path, llama):
    (tmp_path / "out").mkdir()
    out = convert_quietly(source=llama, output=tmp_path / "out")
    assert (out / "config.json").is_file()


def test_one_path_that_is_a_model_folder_is_the_source(tmp_path, llama, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = snapshot(llama)
    assert main([str(llama), "--no-verify", "--no-progress"]) == 0
    assert snapshot(llama) == before
    config = json.loads((tmp_path / "out" / "llama-v2" / "config.json").read_text())
    assert config["model_type"] == "diff_llama" and config["num_hidden_layers"] == 2


@pytest.mark.parametrize(
    "argument", ["HuggingFaceTB/SmolLM2-360M-Instruct", "my-model.gguf", "models/lama/v2", "./models/llama-3"]
)
def test_one_missing_path_that_names_a_checkpoint_is_a_missing_source(tmp_path, llama, monkeypatch, capsys, argument):
    """An uncached Hub id or a mistyped source, given alone, must not become the output of the default model."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sources, "default_source", lambda: llama)  # what would be converted by mistake
    before = snapshot(tmp_path)
    assert main([argument, "--no-verify", "--no-progress"]) == 1
    message = capsys.readouterr().err
    assert argument in message and f"--output {argument}" in message
    assert "does not exist" in message or "not in the local Hugging Face cache" in message
    assert snapshot(tmp_path) == before


def test_the_default_source_into_a_named_output(tmp_path, llama, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sources, "default_source", lambda: llama)
    assert main(["--output", "models/mine", "--no-verify", "--no-progress"]) == 0
    assert (tmp_path / "models" / "mine" / "config.json").is_file()
    assert main(["mine", "--no-verify", "--no-progress"]) == 0  # a new bare name alone is still the output
    assert (tmp_path / "mine" / "config.json").is_file()
    assert main([str(llama), "a", "--output", "b", "--no-verify"]) == 1


def test_interrupted_overwrite_puts_the_old_output_back(tmp_path, llama, monkeypatch, capsys):
    out = convert_quietly(source=llama, output=tmp_path / "out")
    before = snapshot(out)
    rename = Path.rename

    def interrupted_swap(self, target):
        if outputs.TEMP_MARK in self.name:  # the second rename of the swap: the new output into place
            raise KeyboardInterrupt
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", interrupted_swap)
    assert main([str(llama), str(out), "--overwrite", "--no-verify", "--no-progress", "--strategy", "widened"]) == 130
    assert "nothing was written" in capsys.readouterr().err
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "out"]


@pytest.mark.parametrize("name", ["out", "out[v2]*?"])  # glob characters in a name are matched literally
def test_killed_overwrite_is_rolled_back_or_completed_next_run(tmp_path, llama, name):
    out = convert_quietly(source=llama, output=tmp_path / name)
    before = snapshot(out)
    # Killed after moving the old output aside, before moving the new one in: the next run restores it.
    aside = tmp_path / f".{name}{outputs.REPLACED_MARK}{dead_pid()}"
    out.rename(aside)
    with pytest.raises(ConversionError, match="an earlier conversion.*--overwrite"):
        convert_quietly(source=llama, output=out)
    assert snapshot(out) == before and not aside.exists()
    # Killed after the new output was in place, before the old one was removed: the next run removes the old one.
    aside = tmp_path / f".{name}{outputs.REPLACED_MARK}{dead_pid()}"
    (aside / "stale").mkdir(parents=True)
    convert_quietly(source=llama, output=out, overwrite=True, strategy="widened")
    assert not aside.exists() and json.loads((out / "config.json").read_text())["diff_version"] == 1


def test_overwriting_a_linked_output_leaves_no_link_behind(tmp_path, llama):
    """OUTPUT a link to an earlier output: the new output takes the link's place, the folder it pointed to is kept
    as it was, and no moved-aside link is left."""
    target = convert_quietly(source=llama, output=tmp_path / "elsewhere" / "v2")
    before = snapshot(target)
    (tmp_path / "out").symlink_to(target, target_is_directory=True)
    convert_quietly(source=llama, output=tmp_path / "out", overwrite=True, strategy="widened")
    assert (tmp_path / "out").is_dir() and not (tmp_path / "out").is_symlink()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["diff_version"] == 1
    assert snapshot(target) == before
    assert not [path.name for path in tmp_path.iterdir() if outputs.REPLACED_MARK in path.name]


@pytest.mark.parametrize("parent", ["file", "dangling link"])
def test_an_output_whose_parent_cannot_hold_it_is_refused_before_any_work(tmp_path, llama, parent):
    blocker = tmp_path / "runs"
    if parent == "file":
        blocker.write_text("a user's file")
        message = r"lies under .*runs, which is a file, not a folder"
    else:
        blocker.symlink_to(tmp_path / "unmounted-disk")
        message = r"lies under .*runs, a link to .*unmounted-disk, which does not exist"
    before = snapshot(tmp_path)
    with pytest.raises(ConversionError, match=message):
        convert_quietly(source=llama, output=blocker / "deep" / "out")
    assert snapshot(tmp_path) == before


def _run_until(tmp_path, stall_at: str, argv: list[str]) -> subprocess.Popen:
    """A conversion in a child process that stalls at `stall_at` ("writing" or "verifying") and says so."""
    marker = tmp_path / "stalled"
    child = textwrap.dedent(f"""
        import pathlib, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from conversion import verify, writer

        def stall(*args, **kwargs):
            pathlib.Path({str(marker)!r}).touch()
            time.sleep(600)

        if {stall_at!r} == "writing":
            write = writer.StreamingWriter.write
            def write_then_stall(self, key, tensor):
                write(self, key, tensor)
                if self.position == 5:
                    stall()
            writer.StreamingWriter.write = write_then_stall
        else:
            verify.verify = stall
        from conversion.__main__ import main
        sys.exit(main({argv!r}))
    """)
    process = subprocess.Popen([sys.executable, "-c", child], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.05)
    return process


@pytest.mark.parametrize("stall_at", ["writing", "verifying"])
def test_sigterm_cleans_up_and_says_what_is_on_disk(tmp_path, llama, stall_at):
    out = tmp_path / "out"
    process = _run_until(tmp_path, stall_at, [str(llama), str(out), "--no-progress"])
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    if stall_at == "writing":
        assert "nothing was written" in err and not out.exists()
    else:
        assert "was written completely; it was not verified" in err and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_finetune_never_writes_into_its_model_folder(tmp_path, llama):
    before = snapshot(llama)
    for output in (llama, llama / "run", llama.parent):
        with pytest.raises(ValueError, match="output .* (is|lies inside|contains) the model folder"):
            finetune(model=llama, output=output, steps=1)
    assert snapshot(llama) == before


def test_finetune_refuses_an_output_with_files_it_did_not_write(tmp_path, llama):
    out = tmp_path / "results"
    out.mkdir()
    (out / "paper.tex").write_text("keep")
    with pytest.raises(ValueError, match="output .*results holds files finetune did not write \\(paper.tex\\)"):
        finetune(model=llama, output=out, steps=1)
    assert [p.name for p in out.iterdir()] == ["paper.tex"]


# Two runs on one output.


@pytest.fixture
def other_run(tmp_path):
    """A live process that holds a lock on `tmp_path / "out"`, as a second conversion or finetune run would."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    lock = tmp_path / ".out.lock"
    lock.write_text(json.dumps({"pid": process.pid, "host": socket.gethostname(), "tool": "conversion",
                                "since": "12:00:00", "command": "python -m conversion other"}))
    yield process
    process.kill()
    process.wait()


def test_a_second_run_into_an_output_being_written_is_refused(tmp_path, llama, other_run):
    with pytest.raises(ConversionError, match=rf"being written by another run \(conversion, process {other_run.pid}, "
                                              r"since 12:00:00: python -m conversion other\)"):
        convert_quietly(source=llama, output=tmp_path / "out")
    with pytest.raises(ValueError, match=rf"being written by another run \(conversion, process {other_run.pid}"):
        finetune(model=llama, output=tmp_path / "out", data=ROOT / "conversion", steps=1, block_size=16,
                 batch_size=1, eval_tokens=16)
    assert not (tmp_path / "out").exists()
    other_run.kill()
    other_run.wait()
    convert_quietly(source=llama, output=tmp_path / "out")  # its process is gone: the lock is taken over, then freed
    assert (tmp_path / "out" / "config.json").is_file() and not (tmp_path / ".out.lock").exists()


def test_an_output_that_appeared_during_the_run_is_replaced_only_with_overwrite(tmp_path, llama):
    first = convert_quietly(source=llama, output=tmp_path / "first")
    before = snapshot(first)
    temp = tmp_path / ".first.converting-1"
    shutil.copytree(first, temp)
    with pytest.raises(ConversionError, match="appeared while this run was writing .* pass --overwrite"):
        outputs.move_into_place(temp, first, replace=False)
    assert snapshot(first) == before and temp.is_dir()
    outputs.move_into_place(temp, first, replace=True)
    assert snapshot(first) == before and not temp.exists()
