"""``process_exit.exit_before_teardown``: a training entry point's exit status is what the job did, even when the
interpreter's teardown would abort (as it now and then does with ZeRO-3's process groups still alive), and
everything a normal exit does first (joining threads, atexit handlers, flushing stdout) still happens."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True)


def output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


# An entry point whose interpreter teardown aborts: a module global whose finaliser calls os.abort(), run
# while the interpreter finalises, as the gloo groups' destructors are. argv: exit status (or "bug"), how
# the entry point is run ("plain": main() as scripts used to, "wrapped": through exit_before_teardown).
_SCRIPT = """
import atexit, os, sys, threading, time
sys.path.insert(0, {repo!r})
from mtlora_dist.process_exit import exit_before_teardown

class AbortsAtTeardown:
    def __del__(self):
        os.abort()

_held_until_teardown = AbortsAtTeardown()

def main():
    worker = threading.Thread(target=lambda: (time.sleep(0.3), open("thread.txt", "w").write("joined")))
    worker.start()
    atexit.register(lambda: open("atexit.txt", "w").write("ran"))
    sys.stdout.write("buffered output")  # no newline, no flush
    if sys.argv[1] == "bug":
        raise KeyError("a bug")
    sys.exit(int(sys.argv[1]))

if sys.argv[2] == "plain":
    main()
else:
    exit_before_teardown(main)
"""


@pytest.fixture
def entry_point(tmp_path):
    path = tmp_path / "entry.py"
    path.write_text(_SCRIPT.format(repo=str(REPO)))
    return path


def test_without_it_the_teardown_abort_replaces_the_status(entry_point, tmp_path):
    proc = run([str(entry_point), "3", "plain"], tmp_path, PYTHONUNBUFFERED="")
    assert proc.returncode == -6, output(proc)  # SIGABRT: what CI saw from one rank of a finished run


@pytest.mark.parametrize("status", [0, 2, 3])
def test_the_status_is_the_jobs_and_a_normal_exits_work_is_done(entry_point, tmp_path, status):
    proc = run([str(entry_point), str(status), "wrapped"], tmp_path, PYTHONUNBUFFERED="")
    assert proc.returncode == status, output(proc)
    assert proc.stdout == "buffered output"
    assert (tmp_path / "thread.txt").read_text() == "joined"  # the non-daemon thread finished first
    assert (tmp_path / "atexit.txt").read_text() == "ran"


def test_a_bug_keeps_its_traceback_and_status_1(entry_point, tmp_path):
    proc = run([str(entry_point), "bug", "wrapped"], tmp_path)
    assert proc.returncode == 1, output(proc)
    assert "Traceback" in proc.stderr and "KeyError: 'a bug'" in proc.stderr
    assert (tmp_path / "atexit.txt").read_text() == "ran"
