"""Model-written programs are contained: hostile programs as fixtures against `evals/tasks/sandbox.py`.

Each hostile program tries one thing a generated completion could do to the machine that evaluates it. Two kinds:
the plain attacks, which the guard stops with or without namespaces, and the ones that first get around the guard
(it lives in the program's own interpreter, so a program can: `BYPASS` re-imports the raw `posix` module), which
only the namespaces and the subreaper contain. Those run only where the namespaces are in place
(`test_programs_run_in_namespaces_here` fails where they are not, instead of running them unprotected).
"""

import os
import socket
import time
import uuid

import pytest
from test_evals import utils_module

utils = utils_module()
BYPASS = "import sys\ndel sys.modules['posix']\nimport posix\n"  # the guard's functions back, unguarded
SECRET = "hf_" + uuid.uuid4().hex


@pytest.fixture(autouse=True)
def evaluator_environment(monkeypatch, tmp_path):
    """The evaluator holds a token and has a home with a `.ssh` folder; the test's `victim` folder is user data."""
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("keep me")
    return home, victim


def lingering(marker: str) -> list[int]:
    """Processes whose command line holds `marker`."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as file:
                if marker.encode() in file.read():
                    found.append(int(entry))
        except (OSError, ValueError):
            pass
    return found


def intact(home, victim) -> bool:
    return (victim / "notes.txt").read_text() == "keep me" and not any((home / ".ssh").iterdir())


SOLVED = "def add(a, b):\n    return a + b\nassert add(2, 3) == 5\n"


def test_programs_run_in_namespaces_here():
    """The precondition of the tests beyond the guard: the program is process 2 of its own PID namespace, writes
    in its folder, which is its temporary folder too, and has no network."""
    require_namespaces()


def require_namespaces() -> None:
    probe = (
        "import os, socket\n"
        "assert os.getpid() == 2 and os.getppid() == 1\n"
        "assert sorted(p for p in os.listdir('/proc') if p.isdigit()) == ['1', '2']\n"
        "open('here.txt', 'w').write('ok')\n"
        "assert os.environ['TMPDIR'] == os.environ['HOME'] == os.getcwd()\n"
        "try:\n"
        "    socket.create_connection(('1.1.1.1', 53), timeout=2)\n"
        "except OSError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('network')\n"
    )
    assert utils.run_program(probe), (
        "a program does not run in namespaces of its own here (is the kernel refusing unprivileged user namespaces?), "
        "so model-written programs run with the guard, limits and subreaper only (see evals/tasks/sandbox.py)"
    )


def test_canonical_solutions_pass_contained():
    """The containment breaks no honest program: every canonical solution passes its tests (every fourth problem
    and 162, which imports hashlib), and a wrong one still fails."""
    problems = list(utils._problems())
    chosen = [problems[i] for i in sorted({*range(0, 164, 4), 162})]
    programs = [p["prompt"] + p["canonical_solution"] + "\n" + p["test"] + f"\ncheck({p['entry_point']})\n"
                for p in chosen]
    assert all(utils.run_program(program) for program in programs)
    assert utils.run_program(programs[1], namespaces=False)
    assert not utils.run_program(programs[1].replace("return", "return None or", 1) + "\nassert False\n")


GUARDED_ATTACKS = {
    "kills the evaluator": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
    "kills its process group": "import os, signal\nos.killpg(0, signal.SIGKILL)\n",
    "forks a detached child": "import os\nif os.fork() == 0:\n    os.setsid()\n    import time; time.sleep(60)\n",
    "starts a subprocess": "import subprocess\nsubprocess.Popen(['sleep', '60'], start_new_session=True)\n",
    "deletes a folder": "import shutil\nshutil.rmtree({victim!r})\n",
    "deletes a file": "import os\nos.remove({victim!r} + '/notes.txt')\n",
    "writes to ~/.ssh": "open({home!r} + '/.ssh/authorized_keys', 'a').write('ssh-ed25519 AAAA attacker')\n",
    "writes through a symlink": "import os\nos.symlink({home!r} + '/.ssh', 'link')\nopen('link/x', 'w')\n",
    "loads ctypes": "import ctypes\nctypes.CDLL(None).kill(0, 9)\n",
    "takes all memory": "block = bytearray(16 * 2**30)\n",
    "fills the disk": "open('big', 'wb').write(bytes(256 * 2**20))\n",
}


@pytest.mark.parametrize("namespaces", [True, False], ids=["namespaces", "no-namespaces"])
@pytest.mark.parametrize("attack", list(GUARDED_ATTACKS))
def test_a_plain_attack_fails_and_the_evaluation_goes_on(attack, namespaces, evaluator_environment):
    home, victim = evaluator_environment
    program = GUARDED_ATTACKS[attack].format(home=str(home), victim=str(victim))
    assert not utils.run_program(program, namespaces=namespaces)
    assert intact(home, victim)
    assert utils.run_program(SOLVED, namespaces=namespaces)  # this process is alive and the next program runs


def test_pass_at_k_goes_on_past_hostile_programs(evaluator_environment):
    home, victim = evaluator_environment
    hostile = [attack.format(home=str(home), victim=str(victim)) for attack in GUARDED_ATTACKS.values()]
    test = "assert add(2, 3) == 5"
    result = utils.pass_at_k([test], [[*hostile, SOLVED.rsplit("assert", 1)[0]]], k=[1])
    assert result == {"pass@1": pytest.approx(1 / (len(hostile) + 1))}


def test_no_secret_reaches_the_program():
    """The evaluator's HF_TOKEN is in no environment the program can read: its own, its parents' (`/proc`)."""
    program = (
        "import os\n"
        f"secret = {SECRET!r}.encode()\n"
        "assert 'HF_TOKEN' not in os.environ and os.environ['HOME'] == os.getcwd()\n"
        "for pid in [p for p in os.listdir('/proc') if p.isdigit()]:\n"
        "    assert secret not in open(f'/proc/{pid}/environ', 'rb').read()\n"
    )
    assert utils.run_program(program)
    assert utils.run_program(program.split("for pid")[0] + "assert secret not in open('/proc/self/environ', 'rb')"
                             ".read()\n", namespaces=False)


# --- beyond the guard: only the namespaces (or the subreaper) stand in the way ------------------------------------


def test_beyond_the_guard_no_signal_reaches_outside(evaluator_environment):
    """With every signal function back, the program kills all it can see, its parent and init included."""
    program = BYPASS + "posix.kill(posix.getppid(), 9)\nposix.kill(1, 9)\nposix.kill(-1, 9)\n"
    require_namespaces()  # never run this unprotected
    utils.run_program(program)
    assert utils.run_program(SOLVED)


@pytest.mark.parametrize("namespaces", [True, False], ids=["namespaces", "no-namespaces"])
@pytest.mark.parametrize("ends", ["returns", "times out"])
def test_beyond_the_guard_nothing_outlives_the_program(ends, namespaces):
    """A grandchild in a session of its own (setsid, then exec of another program) is ended with the program,
    whether it returned or ran past its time."""
    marker = f"lingering-{uuid.uuid4().hex}"
    program = BYPASS + (
        "import sys\n"
        "if posix.fork() == 0:\n"
        "    posix.setsid()\n"
        "    if posix.fork() == 0:\n"
        f"        posix.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(120)', {marker!r}])\n"
        "    posix._exit(0)\n"
        "import time\n"
        "time.sleep(0.5)\n"
        + ("while True:\n    pass\n" if ends == "times out" else "")
    )
    if namespaces:
        require_namespaces()
    started = time.monotonic()
    result = utils.run_program(program, timeout=3.0, namespaces=namespaces)
    assert result == (ends == "returns")
    assert time.monotonic() - started < 10
    assert lingering(marker) == []


def test_beyond_the_guard_files_outside_the_folder_are_read_only(evaluator_environment):
    home, victim = evaluator_environment
    program = BYPASS + (
        "import errno\n"
        f"for action in (lambda: posix.unlink({str(victim / 'notes.txt')!r}), lambda: posix.rmdir({str(victim)!r}),\n"
        f"               lambda: posix.open({str(home / '.ssh' / 'authorized_keys')!r}, posix.O_WRONLY | posix.O_CREAT),\n"
        "               lambda: posix.open('/tmp/planted', posix.O_WRONLY | posix.O_CREAT)):\n"
        "    try:\n"
        "        action()\n"
        "    except OSError as error:\n"
        "        assert error.errno in (errno.EROFS, errno.EACCES, errno.EPERM), error\n"
        "    else:\n"
        "        raise AssertionError('written')\n"
        "posix.open('mine.txt', posix.O_WRONLY | posix.O_CREAT)\n"  # its own folder stays writable
    )
    require_namespaces()
    assert utils.run_program(program)
    assert intact(home, victim)


def test_beyond_the_guard_no_network():
    """A server of the evaluator's on loopback is out of the program's reach."""
    require_namespaces()
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        server.settimeout(0.5)
        program = (
            "import socket\n"
            "try:\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'stolen')\n"
            "except OSError:\n"
            "    pass\n"
            "else:\n"
            "    raise AssertionError('connected')\n"
        )
        assert utils.run_program(program)
        with pytest.raises(TimeoutError):
            server.accept()


def test_the_time_limit_holds_against_a_program_that_ignores_signals():
    program = BYPASS + "import signal\nfor s in (signal.SIGTERM, signal.SIGINT):\n    signal.signal(s, signal.SIG_IGN)\n" \
        "while True:\n    pass\n"
    started = time.monotonic()
    assert not utils.run_program(program, timeout=1.0)
    assert time.monotonic() - started < 6
