"""The output folder: which folders a conversion may write or replace, and a replacement that cannot lose data.

A conversion writes into a temporary folder beside OUTPUT and moves it into place when complete. Replacing an
existing OUTPUT (`overwrite`) is allowed only for a folder this tool wrote itself, recognised by its manifest
(`MANIFEST_NAME`, which lists every file the conversion wrote), holding nothing else; never for the source, a folder
that contains or lies inside the source, or the current folder or one above it. The replacement is a swap of two
renames; whatever interrupts it, the old output is restored or the new one is in place, in this process or, after
a kill, at the start of the next conversion into the same folder.
"""

import contextlib
import errno
import glob
import json
import os
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from transformers.utils import logging

from .errors import ConversionError

logger = logging.get_logger(__name__)

MANIFEST_NAME = "diffllama_conversion.json"
WRITTEN_BY = "diffllama conversion"
TEMP_MARK = ".converting-"
REPLACED_MARK = ".replaced-"
LOCK_MARK = ".lock"


def inside(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies below it (both resolved)."""
    return path == folder or folder in path.parents


def check_output(output: Path, *, source: Path, overwrite: bool) -> None:
    """Refuse an OUTPUT that would destroy or pollute something: every check runs before anything is written.

    `output` and `source` are absolute; `source` is the source's folder, or its file for a GGUF source.
    """
    real_output, real_source = output.resolve(), source.resolve()
    if real_output.exists() and not real_output.is_dir():
        raise ConversionError(f"output {output} is a file, not a folder: choose a folder path (it is created).")
    for parent in output.parents:  # the folders above OUTPUT, made when missing: checked now, not after the work
        if parent.is_symlink() and not parent.exists():
            raise ConversionError(
                f"output {output} lies under {parent}, a link to {os.readlink(parent)}, which does not exist: create "
                "what it points to, or choose another folder."
            )
        if parent.exists():
            if not parent.is_dir():
                raise ConversionError(
                    f"output {output} lies under {parent}, which is a file, not a folder: choose another folder."
                )
            break
    if real_output == real_source:
        raise ConversionError(f"output {output} is the source itself: choose another folder for the converted model.")
    if inside(real_source, real_output):
        raise ConversionError(
            f"output {output} contains the source {source}: replacing it would delete the source; choose a folder "
            "outside it."
        )
    if real_source.is_dir() and inside(real_output, real_source):
        raise ConversionError(
            f"output {output} lies inside the source folder {source}: keep the source as it was and choose a "
            "folder outside it."
        )
    if inside(Path.cwd().resolve(), real_output):
        raise ConversionError(
            f"output {output} is the current folder or one above it: choose a new folder for the converted model, "
            "e.g. out/MODEL-NAME."
        )
    if not real_output.is_dir() or not any(real_output.iterdir()):
        return  # nothing there, or an empty folder: nothing to lose
    foreign = foreign_files(real_output)
    if foreign is None:
        raise ConversionError(
            f"output {output} already exists and was not written by this tool (it has no {MANIFEST_NAME}): choose "
            "another folder; --overwrite only replaces an earlier conversion's output."
        )
    if foreign:
        listed = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ConversionError(
            f"output {output} is an earlier conversion's output but also holds files it did not write ({listed}): "
            "move them elsewhere or choose another folder; nothing was changed."
        )
    if not overwrite:
        raise ConversionError(
            f"output {output} already exists (an earlier conversion): choose another folder or pass --overwrite "
            "to replace it."
        )


@dataclass(frozen=True)
class Manifest:
    """A file by which a tool recognises a folder as its own output: it lists every file the tool wrote there.

    `also_ours` is a pattern for the paths of files the tool writes as it goes (a training run's checkpoints), so
    they count as its own without being listed; it must match a whole path, so a user's folder beside them (a
    hand-copied `checkpoints/best/`) stays foreign.
    """

    name: str
    written_by: str
    also_ours: str | None = None

    def read(self, folder: Path) -> dict | None:
        try:
            manifest = json.loads((folder / self.name).read_text())
        except (OSError, ValueError):
            return None
        return manifest if isinstance(manifest, dict) and manifest.get("written_by") == self.written_by else None

    def foreign_files(self, folder: Path) -> list[str] | None:
        """Files under `folder` that the manifest does not list; `None` if `folder` has no manifest of this tool."""
        manifest = self.read(folder)
        if manifest is None:
            return None
        listed = set(manifest.get("files", [])) | {self.name}
        ours = re.compile(self.also_ours).fullmatch if self.also_ours else lambda name: False
        return [name for name in files_under(folder) if name not in listed and not ours(name)]

    def write(self, folder: Path, facts: dict, files: list[str] | None = None) -> None:
        """Record `facts` and `files` (default: every file now in `folder`) as this tool's."""
        files = files_under(folder) if files is None else files
        manifest = {"written_by": self.written_by, **facts, "files": [name for name in files if name != self.name]}
        (folder / self.name).write_text(json.dumps(manifest, indent=2) + "\n")


def files_under(folder: Path) -> list[str]:
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if not path.is_dir())


CONVERSION = Manifest(MANIFEST_NAME, WRITTEN_BY)


def foreign_files(folder: Path) -> list[str] | None:
    """Files under `folder` that its conversion manifest does not list; `None` if it has no manifest of ours."""
    return CONVERSION.foreign_files(folder)


def write_manifest(folder: Path, facts: dict) -> None:
    """List every file in `folder` (the finished temporary folder) as this tool's, with `facts` about the run."""
    CONVERSION.write(folder, facts)


def temporary_folder(output: Path) -> Path:
    return output.parent / f".{output.name}{TEMP_MARK}{os.getpid()}"


def _replaced_folder(output: Path, pid: int) -> Path:
    return output.parent / f".{output.name}{REPLACED_MARK}{pid}"


def recover(output: Path) -> None:
    """Finish what a killed conversion into `output` left behind (only folders whose process is gone).

    A half-written temporary folder is removed. An old output moved aside by an interrupted overwrite is put back
    when no output is in place, and removed when the new output is (the swap had completed).
    """
    if not output.parent.is_dir():
        return
    name = glob.escape(output.name)  # a name may hold glob characters: [, *, ?
    for folder in sorted(output.parent.glob(f".{name}{REPLACED_MARK}*")):
        if _running(folder):
            continue
        if output.exists():
            logger.warning(f"removing {folder}, the old output that an interrupted overwrite had replaced")
            _remove(folder)
        else:
            logger.warning(f"restoring {output} from {folder}, moved aside by an interrupted overwrite")
            folder.rename(output)
    for folder in output.parent.glob(f".{name}{TEMP_MARK}*"):
        if not _running(folder):
            logger.warning(f"removing {folder}, left by an interrupted conversion")
            shutil.rmtree(folder, ignore_errors=True)


def _remove(path: Path) -> None:
    """Remove an old output moved aside: a folder with what it holds, or a link (never what the link points to)."""
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def _running(folder: Path) -> bool:
    """Whether the conversion that made `folder` (its name ends with the process id) is still running."""
    pid = folder.name.rsplit("-", 1)[-1]
    return pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid))


def disk_full(error: OSError) -> bool:
    return error.errno in (errno.ENOSPC, errno.EDQUOT)


def move_into_place(temp: Path, output: Path, *, manifest: Manifest = CONVERSION, replace: bool = True) -> None:
    """Rename the finished `temp` to `output`, swapping out an earlier output of the tool that `manifest` names when
    `replace` (the run's overwrite option); an output that appeared while `temp` was written (another run) is never
    replaced without it.

    Interrupted between the two renames (Ctrl-C, SIGTERM, an error), the old output is renamed back before the
    exception goes on; killed there, `recover` puts it back on the next run.
    """
    if output.is_dir() and not any(output.iterdir()):
        output.rmdir()
    if not output.exists():
        temp.rename(output)
        return
    if not replace:
        raise ConversionError(
            f"output {output} appeared while this run was writing (another run into the same folder?): nothing was "
            "replaced; choose another folder, or pass --overwrite to replace it."
        )
    changed = manifest.foreign_files(output)
    if changed != []:  # it changed while the new output was written
        added = f" (files added: {', '.join(changed[:3])})" if changed else ""
        raise ConversionError(
            f"output {output} appeared or changed while the new one was written{added}: nothing was replaced; "
            "choose another folder."
        )
    replaced = _replaced_folder(output, os.getpid())
    if output.is_symlink():
        logger.warning(f"{output} was a link to {output.resolve()}: the new output is a folder in its place, and the "
                       "folder it pointed to is left as it was")
    output.rename(replaced)
    try:
        temp.rename(output)
    except BaseException:
        if not output.exists():
            replaced.rename(output)
        raise
    _remove(replaced)


def export_paths(source: str | Path, output: str | Path, *, overwrite: bool) -> tuple[Path, Path]:
    """(source, output) of an export as absolute paths, `output` recovered from an interrupted run and checked as a
    conversion's is: everything an export refuses is refused before its work."""
    source, output = Path(source).expanduser().absolute(), Path(output).expanduser().absolute()
    recover(output)
    check_output(output, source=source, overwrite=overwrite)
    return source, output


@contextlib.contextmanager
def staged(output: Path, record: dict):
    """A folder beside `output` to write a whole output into: on a clean exit it gets the manifest (`record` in it)
    and is renamed into place; on any error, Ctrl-C included, it is removed and `output` is left as it was."""
    output.parent.mkdir(parents=True, exist_ok=True)
    temp = temporary_folder(output)
    temp.mkdir()
    try:
        yield temp
        write_manifest(temp, record)
        move_into_place(temp, output)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def _lock_file(output: Path) -> Path:
    return output.parent / f".{output.name}{LOCK_MARK}"


def claim(output: Path, tool: str) -> None:
    """Hold `output` for this process until `release` (callers release in a `finally`): a second run writing the
    same output, of any of our tools, is refused, naming the process that holds it. A lock left by a process that is gone (killed) or
    by this one (an earlier call that failed) is taken over. `output`'s parent folder must exist."""
    lock = _lock_file(output)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "tool": tool, "since": time.strftime("%H:%M:%S"),
              "command": " ".join(sys.argv)[:300]}
    for _ in range(2):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
            except (OSError, ValueError):
                holder = {}
            pid, host = holder.get("pid"), holder.get("host")
            alive = isinstance(pid, int) and pid != os.getpid() and (host != record["host"] or _alive(pid))
            if alive:
                where = f"process {pid}" + (f" on {host}" if host != record["host"] else "")
                raise ConversionError(
                    f"output {output} is being written by another run ({holder.get('tool', 'a run')}, {where}, since "
                    f"{holder.get('since', '?')}: {holder.get('command', '')}): wait for it to finish or choose "
                    f"another folder. If no such run exists, remove {lock}."
                )
            lock.unlink(missing_ok=True)  # its process is gone, or it is this process's own
            continue
        with os.fdopen(descriptor, "w") as file:
            json.dump(record, file)
        return
    raise ConversionError(f"could not lock {output}: another run keeps taking {lock}; try again")


def release(output: Path) -> None:
    """Give up this process's hold on `output` (nothing if another process holds it)."""
    lock = _lock_file(output)
    try:
        if json.loads(lock.read_text()).get("pid") == os.getpid():
            lock.unlink()
    except (OSError, ValueError):
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
