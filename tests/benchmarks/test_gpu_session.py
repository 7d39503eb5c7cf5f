"""The prepared GPU session: its smoke mode runs every step on the CPU, and its step runner turns a
hang, a crash, a missing package and a spent budget into a recorded status instead of a lost session."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_session  # noqa: E402
from gpu_session import Context, Step  # noqa: E402


@pytest.mark.integration
def test_smoke_session_records_every_step(tmp_path):
    out = tmp_path / "out"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_session.py", "--smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "session.jsonl").read_text().splitlines()]
    status = {r["step"]: r["status"] for r in records}
    assert list(status) == [s.name for s in gpu_session.STEPS]
    assert status["environment"] == "passed" and status["correctness"] == "passed"
    checks = next(r for r in records if r["step"] == "correctness")["result"]["checks"]
    assert {c["status"] for c in checks.values()} == {"passed"}, checks
    for step in gpu_session.STEPS:  # what can run on a CPU passes; the rest says why it did not run
        expected = f"skipped ({step.cpu_skip})" if step.cpu_skip else "passed"
        assert status[step.name] == expected, (step.name, status[step.name], (out / "steps.log").read_text()[-4000:])
    assert status["h2d_copy"] == "skipped (needs CUDA)"
    summary = (out / "summary.md").read_text()
    assert "| step | status | seconds | key figures |" in summary and "| launcher | passed |" in summary
    assert "===== correctness: passed" in (out / "steps.log").read_text()
    assert len(list(out.iterdir())) <= 8  # what the GPU machine sends back
    print(f"smoke session: {seconds:.0f} s")


def _ctx(tmp_path: Path) -> Context:
    return Context(smoke=True, cuda=False, work=tmp_path)


def _python_step(code: str, timeout_s: float = 30, **kwargs) -> Step:
    """A step whose 'script' is ``python -c code`` (the runner appends ``--json PATH``: sys.argv[2])."""
    return Step(
        "probe", timeout_s, lambda ctx: ["-c", code], lambda r: {"value": r.get("value")}, needs=["json"], **kwargs
    )


def test_a_step_that_writes_its_result_passes_with_its_figures(tmp_path):
    step = _python_step("import json, sys; json.dump({'value': 7}, open(sys.argv[2], 'w'))")
    record, _ = gpu_session.run_step(step, _ctx(tmp_path), time_left=60)
    assert record["status"] == "passed" and record["figures"] == {"value": 7} and record["result"] == {"value": 7}


def test_a_hanging_step_costs_only_the_time_left_and_its_children_die(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_session, "MIN_STEP_S", 1)
    code = (
        "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
        "open(sys.argv[2] + '.pid', 'w').write(str(p.pid)); time.sleep(60)"
    )
    start = time.perf_counter()
    record, _ = gpu_session.run_step(_python_step(code, timeout_s=300), _ctx(tmp_path), time_left=3)
    assert record["status"] == "timeout" and record["timeout_s"] == 3 and time.perf_counter() - start < 20
    child = int(Path(str(tmp_path / "probe.json") + ".pid").read_text())
    time.sleep(0.5)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]


def test_a_crash_and_a_failed_judgement_are_told_apart(tmp_path):
    crash, _ = gpu_session.run_step(_python_step("raise SystemExit(3)"), _ctx(tmp_path), time_left=60)
    assert crash["status"] == "crashed (exit 3)"
    code = "import json, sys; json.dump({'value': 1}, open(sys.argv[2], 'w'))"
    failed, _ = gpu_session.run_step(_python_step(code, passed=lambda r: r["value"] > 1), _ctx(tmp_path), 60)
    assert failed["status"] == "failed (exit 0)" and failed["figures"] == {"value": 1}


def test_missing_packages_no_budget_and_cpu_only_machines_skip_a_step(tmp_path):
    ctx = _ctx(tmp_path)
    lacking = Step("x", 10, lambda ctx: [], lambda r: {}, needs=["json", "surely_not_installed_xyz"])
    assert gpu_session.run_step(lacking, ctx, 60)[0]["status"] == "skipped (missing: surely_not_installed_xyz)"
    assert gpu_session.run_step(_python_step("pass"), ctx, time_left=1)[0]["status"] == "skipped (no budget left)"
    cuda_only = _python_step("pass", cpu_skip="needs CUDA")
    assert gpu_session.run_step(cuda_only, ctx, 60)[0]["status"] == "skipped (needs CUDA)"


def test_output_defaults_to_the_device_machines_out_folder(monkeypatch):
    monkeypatch.setenv("OUT", "/tmp/somewhere")
    assert gpu_session.default_out() == "/tmp/somewhere"
    monkeypatch.delenv("OUT")
    assert gpu_session.default_out().endswith("runs/gpu_session")
