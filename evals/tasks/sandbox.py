"""Runs one model-written program contained: `python -I sandbox.py FOLDER --timeout S --memory BYTES`.

`utils.run_program` starts this file as a script, in a fresh temporary FOLDER holding `program.py`, with an
environment that carries no secrets (HOME and TMPDIR are FOLDER). The exit status says what happened: 0 the program
ran to its end, 1 it raised (a failed assertion, `SystemExit` included, as lm-eval's `code_eval` counts it), 2 it ran
past the time limit. Three layers contain it, each of them tested with hostile programs in `tests/test_evals.py`:

1. Namespaces, where Linux lets an unprivileged user create them (most distributions do; some containers do not):
   the program runs in a user, PID, mount and network namespace of its own. It cannot see or signal any process
   outside (the evaluator included), has no network, sees the filesystem read-only except FOLDER, and its own
   `/proc`; when the program returns or its time is up, the namespace's first process ends and the kernel ends
   every process left in it, whatever `setsid` or double fork it used. Without them (`isolated` false), this
   process becomes a child subreaper, so whatever the program starts stays below it and is killed on return or
   timeout, however it detached.
2. Resource limits: address space, CPU seconds, file size, open files, core dumps.
3. A guard in the program's interpreter, a superset of lm-eval's `reliability_guard`: no signals, forks, new
   sessions, subprocesses, deletions, renames, permission changes, `ctypes`, and files written only inside FOLDER.
   It stops accidents and the plain attacks; a determined program can get around any in-interpreter guard, which
   is why the layers above do not rely on it. Without namespaces, it is all that stands between such a program and
   the evaluator's other processes: run code evaluations in a container or virtual machine there.

This file imports nothing of the project, so it runs as a script with only the standard library.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import math
import os
import signal
import sys
import time
from pathlib import Path

PASSED, FAILED, TIMED_OUT = 0, 1, 2

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
PR_SET_CHILD_SUBREAPER = 36
# statvfs's flags, as `mount` takes them when remounting (a remount in a user namespace must keep these)
_KEPT_FLAGS = {os.ST_NOSUID: MS_NOSUID, os.ST_NODEV: MS_NODEV, os.ST_NOEXEC: MS_NOEXEC, os.ST_NOATIME: MS_NOATIME,
               os.ST_NODIRATIME: MS_NODIRATIME, os.ST_RELATIME: MS_RELATIME}

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _call(function, *arguments) -> None:
    if function(*arguments) != 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number))


def _mount(source: str | None, target: str, kind: str | None, flags: int) -> None:
    encode = lambda text: None if text is None else os.fsencode(text)  # noqa: E731
    _call(_libc.mount, encode(source), encode(target), encode(kind), ctypes.c_ulong(flags), None)


def enter_namespaces(folder: Path) -> bool:
    """User, PID, mount and network namespaces for this process's children, the filesystem read-only but for
    `folder`. False (nothing changed) where the kernel refuses them."""
    uid, gid = os.getuid(), os.getgid()
    try:
        _call(_libc.unshare, CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET)
    except OSError:
        return False
    Path("/proc/self/setgroups").write_text("deny")
    Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
    Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing done here reaches the mounts outside
    _mount(str(folder), str(folder), None, MS_BIND | MS_REC)  # the one writable place, a mount of its own
    for target in _mount_points():
        if target == str(folder) or target == "/proc" or target.startswith("/proc/"):
            continue
        try:
            kept = os.statvfs(target).f_flag
        except OSError:
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | sum(flag for st, flag in _KEPT_FLAGS.items() if kept & st)
        try:
            _mount(None, target, None, flags)
        except OSError:
            pass  # a mount hidden below another, or one the kernel keeps as it is: it stays as it was
    os.chdir(folder)  # through the new mount: the old working folder lies on the read-only one
    return True


def _mount_points() -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        points.append(point.encode().decode("unicode_escape"))  # mountinfo writes spaces as \040
    return points


def limit_resources(timeout: float, memory: int) -> None:
    import resource

    for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, math.ceil(timeout) + 1),
                         (resource.RLIMIT_FSIZE, 64 * 2**20), (resource.RLIMIT_NOFILE, 256),
                         (resource.RLIMIT_CORE, 0)):
        _, hard = resource.getrlimit(limit)
        resource.setrlimit(limit, (value, value if hard == resource.RLIM_INFINITY else min(value, hard)))


def guard(folder: Path) -> None:
    """Takes away, in this interpreter, what a test of a function never needs."""
    import builtins
    import faulthandler
    import io
    import shutil
    import subprocess

    faulthandler.disable()
    for name in ("kill", "killpg", "fork", "forkpty", "setsid", "setpgid", "setpgrp", "system", "popen", "putenv",
                 "unsetenv", "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate",
                 "ftruncate", "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "chroot", "chdir", "fchdir",
                 "setuid", "setgid", "seteuid", "setegid", "setreuid", "setregid", "setresuid", "setresgid", "link",
                 "symlink", "mkfifo", "mknod", "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp",
                 "execvpe", "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnvp", "spawnvpe",
                 "posix_spawn", "posix_spawnp", "pidfd_open", "register_at_fork"):
        if hasattr(os, name):
            setattr(os, name, None)
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, None)
    subprocess.Popen = None
    signal.pthread_kill = None
    for name in ("ctypes", "_ctypes", "_posixsubprocess", "posix", "resource", "psutil", "ipdb", "joblib",
                 "tkinter", "multiprocessing", "_multiprocessing", "pty"):
        sys.modules[name] = None  # an import of any of them now fails
    opened = builtins.open
    inside = str(folder) + os.sep

    def open_inside(file, mode="r", *arguments, **keywords):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
            path = os.path.realpath(os.fsdecode(file))
            if not path.startswith(inside):
                raise PermissionError(f"{path}: a tested program writes only inside its own folder")
        return opened(file, mode, *arguments, **keywords)

    builtins.open = io.open = open_inside
    builtins.exit = builtins.quit = builtins.help = None


def run_program(folder: Path, timeout: float, memory: int) -> None:
    """In the process that runs the program: limits, guard, the program; never returns."""
    exit_now = os._exit
    limit_resources(timeout, memory)
    source = (folder / "program.py").read_text()
    guard(folder)
    try:
        exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    except BaseException:  # noqa: BLE001 (a failed test, SystemExit included)
        exit_now(FAILED)
    exit_now(PASSED)


def _children() -> list[int]:
    found = []
    for task in Path("/proc/self/task").iterdir():
        try:
            found += map(int, (task / "children").read_text().split())
        except OSError:
            pass
    return found


def _descendants(pid: int) -> list[int]:
    found, stack = [], [pid]
    while stack:
        parent = stack.pop()
        try:
            listed = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            listed = []
        found += map(int, listed)
        stack += map(int, listed)
    return found


def end_everything_below() -> None:
    """Kills and reaps every process below this one (a child subreaper keeps them all below it)."""
    while children := _children():
        for pid in [found for child in children for found in (*_descendants(child), child)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.005)
        # Reap what has ended, then list again: a process forked after the list above is not dead yet, and waiting
        # for it here would wait for ever.
        while True:
            try:
                if os.waitpid(-1, os.WNOHANG) == (0, 0):
                    break
            except ChildProcessError:
                return


def wait(pid: int, deadline: float) -> int | None:
    """The exit status of child `pid`, or None at the deadline."""
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.002)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--timeout", type=float, required=True)
    parser.add_argument("--memory", type=int, required=True, help="address space limit, bytes")
    parser.add_argument("--no-namespaces", dest="namespaces", action="store_false",
                        help="contain the program without namespaces (also where the kernel refuses them)")
    args = parser.parse_args(argv)
    folder = args.folder.resolve()
    os.chdir(folder)
    deadline = time.monotonic() + args.timeout
    isolated = args.namespaces and enter_namespaces(folder)
    if not isolated:
        _call(_libc.prctl, PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    first = os.fork()
    if first == 0:  # in a new PID namespace this process is its init: when it ends, the kernel ends the rest
        try:
            if isolated:
                _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            program = os.fork()
            if program == 0:
                run_program(folder, args.timeout, args.memory)
            status = wait(program, deadline)
            os._exit(TIMED_OUT if status is None else PASSED if status == PASSED else FAILED)
        except BaseException:  # noqa: BLE001
            os._exit(FAILED)
    status = wait(first, deadline + 1)
    if status is None:
        os.kill(first, signal.SIGKILL)
        os.waitpid(first, 0)
    if not isolated:
        end_everything_below()
    return TIMED_OUT if status is None else status if status in (PASSED, FAILED, TIMED_OUT) else FAILED


if __name__ == "__main__":
    sys.exit(main())
