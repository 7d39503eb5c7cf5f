"""The prepared GPU session: its smoke mode runs every step on the CPU, and its step runner turns a
hang, a crash, a missing package and a spent budget into a recorded status instead of a lost session."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_session  # noqa: E402
from gpu_session import Context, Step  # noqa: E402

# the rehearsal of the CUDA start-up has its own test (tests/engine/test_dist_backend.py)
SMOKE_STEPS = [s.name for s in gpu_session.plan_steps("main", cuda=False) if s.name != "cuda_paths"]


@pytest.mark.integration
def test_smoke_session_records_every_step(tmp_path):
    """The main plan on the CPU; its launcher step is the 30-step configuration at 64 px (item: the loss
    must fall beyond its noise there, as on the GPU)."""
    out = tmp_path / "out"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_session.py", "--smoke", "--out", str(out), "--only", *SMOKE_STEPS],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,  # the smoke budget
    )
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "session.jsonl").read_text().splitlines()]
    status = {r["step"]: r["status"] for r in records}
    assert list(status) == SMOKE_STEPS
    assert status["environment"] == "passed" and status["correctness"] == "passed"
    launcher = next(r for r in records if r["step"] == "launcher")["result"]
    assert launcher["steps"] == 30 and launcher["loss_falling"] is True and launcher["resumed"], launcher
    assert launcher["loss_slope_bound"] < 0 and launcher["loss_last5"] < launcher["loss_first5"]
    checks = next(r for r in records if r["step"] == "correctness")["result"]["checks"]
    assert {c["status"] for c in checks.values()} == {"passed"}, checks
    for step in (s for s in gpu_session.STEPS if s.name in SMOKE_STEPS):  # what a CPU can run passes
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
        "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],"
        " start_new_session=True);"  # as torchrun starts ranks: out of the group
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


# -- the plan: one device call of machine start + command within 10 minutes, a warm rerun after it ----------
def test_the_plans_fit_the_device_time_with_every_timeout_inside_the_budget():
    g = gpu_session
    assert g.MACHINE_START_S + g.SETUP_S + g.BUDGET_S <= g.RUN_LIMIT_S <= 600  # one command is at most 600 s
    assert g.RUN_LIMIT_S + g.SETUP_S + g.RERUN_BUDGET_S <= g.DEVICE_TIME_S == 900
    for plan, budget in g.PLANS.items():
        steps = g.plan_steps(plan, cuda=True)
        fixed = [s.timeout_s for s in steps if s.timeout_s is not None]
        assert sum(fixed) + g.COMPILE_MIN_S <= budget, (plan, sum(fixed), budget)
        compiled = [s.name for s in steps if s.timeout_s is None]
        assert compiled == [s.name for s in steps if s.name.endswith("_compiled")] == [steps[-1].name], plan
    main = [s.name for s in g.plan_steps("main", cuda=True)]
    assert main[:4] == ["environment", "correctness", "launcher", "two_ranks_zero2"]  # what proves the GPU paths
    assert "cuda_paths" not in main and "cuda_paths" in [s.name for s in g.plan_steps("main", cuda=False)]
    assert {s.name for s in g.STEPS} == set(main) | {s.name for s in g.plan_steps("extra", cuda=True)} | {"cuda_paths"}


def test_rerun_failed_runs_only_what_did_not_pass_and_keeps_the_rest(tmp_path):
    earlier = [
        {"step": "environment", "status": "passed", "seconds": 9.0, "figures": {"gpu": "H100"}},
        {"step": "launcher", "status": "passed", "seconds": 50.0, "figures": {}},
        {"step": "h2d_copy", "status": "timeout", "seconds": 10.0, "figures": {}},
        {"step": "throughput_swin_b_b32_compiled", "status": "skipped (needs CUDA: x)", "seconds": 0.0, "figures": {}},
    ]
    assert gpu_session.failed_steps(earlier) == ["h2d_copy"]
    (tmp_path / "session.jsonl").write_text("".join(json.dumps(r) + "\n" for r in earlier))
    cmd = [sys.executable, "benchmarks/gpu_session.py", "--smoke", "--out", str(tmp_path), "--rerun-failed"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rerunning the steps that did not pass: h2d_copy" in proc.stdout
    records = [json.loads(line) for line in (tmp_path / "session.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [r["step"] for r in earlier]
    assert records[2]["status"] == "skipped (needs CUDA)" and records[2]["rerun"] is True
    assert (
        records[:2] == earlier[:2]
        and "| environment | passed | 9.0 | gpu: H100 |" in (tmp_path / "summary.md").read_text()
    )
    missing = subprocess.run(
        [*cmd[:-1], "--rerun-failed", str(tmp_path / "none.jsonl")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0 and "none.jsonl" in missing.stderr


def test_a_step_killed_while_compiling_reports_how_long_it_compiled(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_session, "COMPILE_MIN_S", 1)
    code = (
        "import json, sys, time; json.dump({'unfinished': 'the first (compiling) step', 'started_s': 0.5},"
        " open(sys.argv[2], 'w')); time.sleep(60)"
    )
    step = _python_step(code, timeout_s=None)
    record, _ = gpu_session.run_step(step, _ctx(tmp_path), time_left=4)
    assert record["status"] == "timeout" and record["timeout_s"] == 4
    assert record["figures"]["unfinished"] == "the first (compiling) step"
    assert 2.5 <= record["figures"]["ran_s"] <= 4


# -- the launcher's loss check, and the carried wheels' pins -------------------------------------------------
def test_the_loss_must_fall_beyond_its_noise():
    from launcher_run import judge_losses

    noise = [0.4, -0.3, 0.1, -0.5, 0.2, 0.0, 0.3, -0.2, -0.4, 0.5, 0.1, -0.1]
    falling = [10 - 0.2 * i + n for i, n in enumerate(noise * 2 + noise[:6])]
    assert judge_losses(falling)["loss_falling"] is True
    flat = [10 + n for n in noise * 2 + noise[:6]]
    assert judge_losses(flat)["loss_falling"] is False  # last five below the first five by chance is not enough
    lucky = [10 + n for n in noise * 2 + noise[:6]][:25] + [9.6] * 5
    assert statistics.mean(lucky[-5:]) < statistics.mean(lucky[:5]) and judge_losses(lucky)["loss_falling"] is False
    assert (
        judge_losses(falling[:9])["loss_falling"] is None
        and judge_losses([1.0, float("nan")] * 6)["losses_finite"] is False
    )


def test_the_carried_wheels_are_pinned_inside_pyprojects_ranges():
    import tomllib
    from packaging.requirements import Requirement

    ranges = {
        Requirement(r).name: Requirement(r).specifier
        for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    pins = [line.split("#")[0].split() for line in (REPO / "benchmarks" / "gpu_wheels.txt").read_text().splitlines()]
    pins = [Requirement(p[0]) for p in pins if p]
    carried = {"deepspeed", "hydra-core", "omegaconf", "webdataset", "timm", "pydantic", "torchjd", "quadprog"}
    assert carried | {"qpsolvers", "submitit", "cloudpickle"} <= {p.name for p in pins}
    for pin in pins:
        (version,) = [spec.version for spec in pin.specifier if spec.operator == "=="]
        if pin.name in ranges:
            assert version in ranges[pin.name], (pin, ranges[pin.name])
    script = (REPO / "benchmarks" / "build_wheels.sh").read_text()
    assert ".venv" not in script and "gpu_wheels.txt" in script
    proc = subprocess.run(
        ["bash", "benchmarks/build_wheels.sh", str(REPO / "no-such-dir")],
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "PYTHON": "/nonexistent/python3"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "no Python at '/nonexistent/python3'" in proc.stderr


def test_every_module_the_code_imports_is_on_the_gpu_image_or_carried():
    """A new dependency (torchjd, submitit) must reach the bare GPU machine: on its image (the twin's
    IMAGE list, plus torch), carried as a pinned wheel, or optional for the session."""
    import re
    import sys

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name as canonical

    sys.path.insert(0, str(REPO / "benchmarks"))
    import env_report

    twin = (REPO / "benchmarks" / "device_twin.sh").read_text()
    image = set(re.search(r"^IMAGE=\(([^)]*)\)", twin, re.M).group(1).split()) | {"torch", "torchvision"}
    lines = (REPO / "benchmarks" / "gpu_wheels.txt").read_text().splitlines()
    carried = {Requirement(line.split()[0]).name for line in lines if line.strip() and not line.startswith("#")}
    reached = {canonical(name) for name in image | carried}
    modules = set(env_report.imported_modules()) - set(env_report.OPTIONAL)
    unreached = {m for m in modules if canonical(env_report.PACKAGES.get(m, m)) not in reached}
    assert "torchjd" in modules and "submitit" in modules  # the scan sees them
    assert unreached == set(), f"pin them in benchmarks/gpu_wheels.txt: {sorted(unreached)}"
