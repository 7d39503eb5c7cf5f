"""The GPU run's environment step imports every third-party module the code imports (not a fixed list),
so a package missing on the lent machine fails that step, naming the module and who imports it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

from env_report import OPTIONAL, imported_modules  # noqa: E402


def _hide(folder: Path, *modules: str) -> None:
    for name in modules:
        (folder / f"{name}.py").write_text(f'raise ImportError("No module named {name!r} (hidden by the test)")\n')


def _env_report(tmp_path: Path, hidden: tuple[str, ...]) -> tuple[subprocess.CompletedProcess, dict]:
    folder = tmp_path / "hidden"
    folder.mkdir()
    _hide(folder, *hidden)
    out = tmp_path / "env.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(REPO)])}
    proc = subprocess.run(
        [sys.executable, "benchmarks/env_report.py", "--json", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc, json.loads(out.read_text())


def test_the_scan_finds_the_imports_inside_functions_and_skips_our_own_modules():
    modules = imported_modules()
    assert "mtlora_dist/data/shards/encoding.py" in modules["simplejpeg"]  # imported inside a function
    assert {"torch", "timm", "deepspeed", "webdataset", "hydra", "omegaconf"} <= set(modules)
    assert not {"mtlora_dist", "common", "os", "json", "__future__"} & set(modules)


def test_a_missing_required_module_fails_the_step_and_names_its_importer(tmp_path):
    proc, report = _env_report(tmp_path, ("webdataset", "simplejpeg"))
    assert proc.returncode == 1
    assert not report["passed"] and list(report["import_failures"]) == ["webdataset"]
    assert "hidden by the test" in report["import_failures"]["webdataset"]
    assert "imported by mtlora_dist/" in report["import_failures"]["webdataset"]
    assert list(report["optional_missing"]) == ["simplejpeg"]  # has a fallback: reported, not a failure
    assert OPTIONAL["simplejpeg"] in report["optional_missing"]["simplejpeg"]
    assert "cannot import webdataset" in proc.stderr and "build_wheels.sh" in proc.stderr


def test_with_only_optional_modules_missing_the_step_passes(tmp_path):
    proc, report = _env_report(tmp_path, ("simplejpeg", "pyspng"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert report["passed"] and report["import_failures"] == {}
    assert set(report["optional_missing"]) == {"simplejpeg", "pyspng"}


def test_the_timm_check_names_a_release_the_model_cannot_use(monkeypatch):
    """The model reaches into timm's Swin (``block._attn``, ``downsample.out_dim``); the GPU machine's timm
    version is unknown, so the environment step checks it (and gpu_session.sh installs the carried one)."""
    import env_report
    from timm.models import swin_transformer

    assert env_report.timm_check()["passed"], env_report.timm_check()
    assert env_report.timm_requirement() == ">=1.0.20"
    monkeypatch.delattr(swin_transformer.SwinTransformerBlock, "_attn")
    check = env_report.timm_check()
    assert not check["passed"] and check["problems"] == ["SwinTransformerBlock has no _attn method"]
    monkeypatch.setattr(env_report, "_version", lambda name: "0.9.16")
    assert "timm 0.9.16 is outside pyproject.toml's timm>=1.0.20" in env_report.timm_check()["problems"]
