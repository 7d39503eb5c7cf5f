"""Credentials never reach what the project writes or hands to wandb: marker values are refused on the command
line (launchers print their arguments before our code runs), and markers that come in through a config file
or an environment variable appear nowhere in the run folder, the wandb folder or the output."""

from __future__ import annotations

from pathlib import Path

import pytest
from runs import deepspeed_launcher

from cli_utils import REPO, TINY, output, run, script

KEY, SECRET = "MARKERKEY7f3a9c", "MARKERSECRET2b8e41"


def files_containing(root: Path, *markers: str) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits += [f"{path}: {m}" for m in markers if m.encode() in data]
    return hits


def test_credentials_on_the_command_line_are_refused_without_echoing_them(tmp_path):
    proc = run(
        [script("train.py"), f"data.storage.key={KEY}", f"data.storage.secret={SECRET}", f"run_dir={tmp_path / 'run'}"],
        tmp_path,
    )
    assert proc.returncode == 2, output(proc)
    assert "must not be given on the command line" in proc.stderr and "AWS_SECRET_ACCESS_KEY" in proc.stderr
    assert KEY not in output(proc) and SECRET not in output(proc)
    assert not (tmp_path / "run").exists()


@pytest.mark.integration
def test_credential_markers_appear_nowhere_a_run_writes(tmp_path):
    """Secret from the recipe file, key from an environment variable named on the command line; wandb on
    (offline). Then grep the run folder (config.yaml, metrics, checkpoints, reports, wandb/) and the output."""
    recipe = (REPO / "configs" / "quickstart.yaml").read_text() + f"data:\n  storage:\n    secret: {SECRET}\n"
    (tmp_path / "mine.yaml").write_text(recipe)  # outside configs/: the package's groups are found
    run_dir = tmp_path / "run"
    proc = run(
        [
            script("train.py"),
            "--config",
            str(tmp_path / "mine.yaml"),
            *TINY,
            f"run_dir={run_dir}",
            f"data.synthetic.root={tmp_path / 'data'}",
            "data.storage.key=${oc.env:MTLORA_TEST_KEY}",
            "logging.wandb.enabled=true",
            "logging.wandb.mode=offline",
        ],
        tmp_path,
        env={"MTLORA_TEST_KEY": KEY},
    )
    assert proc.returncode == 0, output(proc)[-3000:]
    assert (run_dir / "wandb").is_dir() and list((run_dir / "checkpoints").glob("step_*"))
    assert files_containing(run_dir, KEY, SECRET) == []
    assert files_containing(run_dir / "wandb", "logging.wandb.mode=offline") == []  # wandb kept no command line
    assert KEY not in output(proc) and SECRET not in output(proc)
    saved = (run_dir / "config.yaml").read_text()
    assert "key: '***'" in saved and "secret: '***'" in saved
    assert "wandb sync " in output(proc)  # the offline run says how to upload it


@pytest.mark.integration
def test_under_the_deepspeed_launcher_only_the_launchers_own_lines_show_them(tmp_path):
    """The deepspeed launcher prints its argv (``cmd = ...``, ``spawned with command``) before any of our code
    runs; the run is refused, and nothing of ours repeats the values."""
    launcher = deepspeed_launcher()
    proc = run(
        [script("train.py"), f"data.storage.key={KEY}", f"data.storage.secret={SECRET}", f"run_dir={tmp_path / 'run'}"],
        tmp_path,
        python=launcher,
        timeout=180,
    )
    assert proc.returncode == 2, output(proc)[-3000:]
    assert "must not be given on the command line" in proc.stderr
    ours = [
        line
        for line in output(proc).splitlines()
        if (KEY in line or SECRET in line)
        and not ("cmd = " in line or "spawned with command" in line or "exits with return code" in line)
    ]
    assert ours == [], ours
    assert not (tmp_path / "run").exists()
