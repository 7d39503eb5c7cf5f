"""What a person sees and keeps of a run's output (issue 26, items 1, 9 and 10): Ctrl-C through ``2>&1 | tee``
still writes the stop checkpoint and its line into the log, progress goes to stdout (so ``| tee`` keeps it),
and ``ruff check`` does not depend on a ``runs/`` folder left by the quickstart."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from runs import TINY_RUN

from cli_utils import REPO, TINY, output, run, script

ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _metrics_rows(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("tee") is None or not os.path.isdir("/proc"), reason="needs tee and /proc")
@pytest.mark.parametrize("launcher", ["python", "deepspeed"])
def test_ctrl_c_through_tee_keeps_the_stop_checkpoint_and_its_line(tmp_path, launcher):
    """``(<launcher> train.py ...; echo $? > status) 2>&1 | tee log`` in its own process group, SIGINT to the
    group (what a terminal's Ctrl-C does): tee dies at once, the trainer finishes its step, writes one complete
    checkpoint, its "stopping at step" line lands in tee's log, and it exits 3 (under deepspeed the launcher
    returns at once with its own status; its ranks go on into tee's file)."""
    from runs import deepspeed_launcher

    run_dir, log, status = tmp_path / "run", tmp_path / "log", tmp_path / "status"
    prefix = [sys.executable] if launcher == "python" else deepspeed_launcher()
    args = [*prefix, script("train.py"), *TINY_RUN, "data.num_workers=1", "data.synthetic.num_train=32",
            "data.synthetic.num_val=4", "logging.wandb.enabled=false", "checkpoint.every=0", "max_steps=60",
            f"run_dir={run_dir}", f"data.synthetic.root={tmp_path / 'data'}"]  # fmt: skip
    line = f"({shlex.join(args)}; echo $? > {status}) 2>&1 | tee {log}"
    shell = subprocess.Popen(["bash", "-c", line], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while _metrics_rows(run_dir) < 3:
        assert shell.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    os.killpg(shell.pid, signal.SIGINT)
    shell.wait(timeout=180)
    deadline = time.monotonic() + 120  # deepspeed's ranks finish after their launcher has returned
    while "stopping at step" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1)
    text = log.read_text()
    if launcher == "python":  # deepspeed's runner prints its own KeyboardInterrupt traceback (README)
        assert status.read_text().strip() == "3" and "Traceback" not in text, text[-3000:]
    assert "stopping at step" in text and "[rank0]" not in text, text[-3000:]
    complete = [p.parent.name for p in (run_dir / "checkpoints").glob("step_*/COMPLETE.json")]
    assert len(complete) == 1, (complete, text[-3000:])
    steps = [json.loads(r)["step"] for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert f"step_{max(steps):08d}" == complete[0]


def test_progress_goes_to_stdout_and_warnings_to_stderr(tmp_path):
    """``python launch/train.py | tee out.log`` keeps the progress lines; stderr holds no progress."""
    proc = run([script("train.py"), *TINY, f"run_dir={tmp_path / 'run'}", f"data.synthetic.root={tmp_path / 'd'}",
                "logging.wandb.enabled=false"], tmp_path)  # fmt: skip
    assert proc.returncode == 0, output(proc)[-3000:]
    assert "step 2/2 | loss" in proc.stdout and "evaluation at step 2" in proc.stdout, proc.stdout[-3000:]
    assert "step 2/2" not in proc.stderr and "r0] run_dir" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is a dev dependency")
def test_ruff_passes_with_and_without_a_runs_folder(tmp_path):
    """The quickstart writes ``runs/`` at the checkout's root; ``tests/runs.py`` must not become a first-party
    package then (ruff's cache hid this: --no-cache)."""
    copy = tmp_path / "checkout"
    copy.mkdir()
    shutil.copy(REPO / "pyproject.toml", copy)
    shutil.copytree(REPO / "tests", copy / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "mtlora_dist", copy / "mtlora_dist", ignore=shutil.ignore_patterns("__pycache__"))
    for with_runs in (False, True):
        if with_runs:
            (copy / "runs" / "quickstart").mkdir(parents=True)
        proc = subprocess.run(["ruff", "check", "--no-cache", "tests"], cwd=copy, capture_output=True, text=True)
        assert proc.returncode == 0, (with_runs, proc.stdout[-3000:])


@pytest.mark.integration
def test_a_stop_during_an_evaluation_says_it_finishes_the_evaluation(tmp_path):
    """SIGINT right after step 3's record, when the evaluation of step 3 is running (48 batches)."""
    run_dir = tmp_path / "run"
    args = [sys.executable, script("train.py"), *TINY_RUN, "data.batch_size=2", "data.eval_batch_size=2",
            "data.synthetic.num_train=16", "data.synthetic.num_val=96", "eval.every=3", "eval.max_batches=48",
            "eval.visual_samples=0", "logging.wandb.enabled=false", "checkpoint.every=0", "max_steps=30",
            f"run_dir={run_dir}", f"data.synthetic.root={tmp_path / 'data'}"]  # fmt: skip
    log = tmp_path / "log"
    with open(log, "w") as out:
        proc = subprocess.Popen(args, cwd=REPO, env=ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    while _metrics_rows(run_dir) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=180) == 3, log.read_text()[-3000:]
    text = log.read_text()
    assert "received SIGINT: finishing the evaluation, then a checkpoint and exit 3" in text, text[-3000:]


@pytest.mark.integration
def test_ctrl_c_under_deepspeed_ends_quietly_with_a_complete_wandb_run(tmp_path):
    """The deepspeed launcher terminates each rank's process tree on Ctrl-C; wandb's service must not be in it:
    no socket errors, no wandb failure, no atexit traceback, and the offline run is closed with its sync line."""
    from runs import deepspeed_launcher

    run_dir = tmp_path / "run"
    args = [*deepspeed_launcher(), script("train.py"), *TINY_RUN, "data.synthetic.num_train=32",
            "data.synthetic.num_val=4", "checkpoint.every=0", "max_steps=60", "logging.wandb.enabled=true",
            "logging.wandb.mode=offline", f"run_dir={run_dir}", f"data.synthetic.root={tmp_path / 'data'}"]  # fmt: skip
    log = tmp_path / "log"
    with open(log, "w") as out:
        proc = subprocess.Popen(args, cwd=REPO, env=ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    while _metrics_rows(run_dir) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=120)
    deadline = time.monotonic() + 120  # the ranks finish after the launcher has returned
    while "wandb run saved offline" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2)
    text = log.read_text()
    assert "stopping at step" in text and "wandb run saved offline" in text, text[-3000:]
    for noise in ("socket.send()", "wandb failed", "Exception ignored", "ConnectionResetError"):
        assert noise not in text, (noise, text[-3000:])
    assert len(list((run_dir / "checkpoints").glob("step_*/COMPLETE.json"))) == 1
