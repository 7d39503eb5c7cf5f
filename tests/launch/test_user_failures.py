"""Failures a user can cause (issue 26): each ends in one clear line and exit 2, nothing is lost or counted
twice, and no credential is accepted on, or echoed from, the command line. Real processes throughout."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from runs import TINY_RUN

from cli_utils import REPO, TINY, output, run, script

KEY, SECRET = "AKIAMARKER7f3a9c", "s3cr3tMARKER2b8e41"


def assert_one_line_exit_2(proc: subprocess.CompletedProcess, *expected: str) -> str:
    text = output(proc)
    assert proc.returncode == 2, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for part in expected:
        assert part in proc.stderr, (part, proc.stderr[-3000:])
    return proc.stderr


# -- item 4: credentials ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override",
    [
        f"data.storage={{key: {KEY}, secret: {SECRET}}}",
        f"+data.storage={{endpoint_url: 'http://127.0.0.1:1', secret: {SECRET}}}",
        f"data.train_url=s3://{KEY}:{SECRET}@bucket/pascal/train",
        f"run_dir=s3://{KEY}:{SECRET}@bucket/runs/x",
        f"data.train_url=s3://{KEY}:{SECRET[:6]}/{SECRET[6:]}@bucket/train",  # issue 33 item 14: '/' in a secret
        f"data.storage.secret=${{oc.env:MTLORA_UNSET_VARIABLE,{SECRET}}}",  # issue 33 item 15: a literal default
        f"data.storage={{key: '${{oc.env:MTLORA_UNSET_VARIABLE,{KEY}}}'}}",
    ],
    ids=[
        "mapping",
        "mapping-with-plus",
        "data-url-userinfo",
        "run-dir-userinfo",
        "slash-in-secret",
        "env-default",
        "env-default-in-mapping",
    ],  # fmt: skip
)
def test_credentials_inside_an_override_are_refused_without_echoing_them(tmp_path, override):
    proc = run([script("train.py"), override, "--cfg", "job"], tmp_path)
    assert_one_line_exit_2(proc, "must not be given on the command line", "AWS_SECRET_ACCESS_KEY")
    for part in (KEY, SECRET[:6], SECRET[6:]):
        assert part not in output(proc), output(proc)


@pytest.mark.parametrize("secret", [SECRET, f"{SECRET[:6]}/{SECRET[6:]}"], ids=["plain", "with-slash"])
def test_a_url_with_credentials_in_a_config_file_is_refused_without_echoing_it(tmp_path, secret):
    """Not on the command line but in a config file: refused too (s3fs would take ``KEY:SECRET@bucket`` for
    the bucket's name and print it), without echoing it; a secret with '/' in it too (issue 33 item 14: it
    was read as the bucket 'KEY:SECR' and printed)."""
    recipe = (REPO / "configs" / "quickstart.yaml").read_text()
    recipe += f"data:\n  train_url: s3://{KEY}:{secret}@no-bucket/train\n  val_url: s3://no-bucket/val\n"
    (tmp_path / "mine.yaml").write_text(recipe)
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
    proc = run([script("train.py"), "--config", str(tmp_path / "mine.yaml"), *TINY, "data.storage.retries=0",
                "data.storage.read_retries=1", "data.storage.retry_delay_s=0.05", f"run_dir={tmp_path / 'r'}"],
               tmp_path, env=env, timeout=240)  # fmt: skip
    assert_one_line_exit_2(proc, "'data.train_url' is a URL with credentials in it")
    for part in (KEY, SECRET[:6], SECRET[6:]):
        assert part not in output(proc), output(proc)[-3000:]


# -- item 3: a kill before the first complete checkpoint ----------------------------------------------------
def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(r)["step"] for r in path.read_text().splitlines() if r.strip() and '"train"' in r]


@pytest.mark.integration
def test_a_rerun_after_a_kill_before_any_checkpoint_logs_every_step_once(tmp_path):
    run_dir = tmp_path / "run"
    common = [*TINY_RUN, "logging.wandb.enabled=false", "data.synthetic.num_train=32", "data.synthetic.num_val=4",
              "eval.max_batches=1", "eval.visual_samples=0", "checkpoint.every=0", f"run_dir={run_dir}",
              f"data.synthetic.root={tmp_path / 'data'}"]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, script("train.py"), *common, "max_steps=200"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 240
    while len(_steps(run_dir)) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, "the first run ended before step 3"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list((run_dir / "checkpoints").glob("step_*/COMPLETE.json"))
    rerun = run([script("train.py"), *common, "max_steps=4"], tmp_path)
    assert rerun.returncode == 0, output(rerun)[-3000:]
    assert _steps(run_dir) == [1, 2, 3, 4]


def test_messages_and_log_lines_mask_a_urls_user_info():
    sys.path.insert(0, str(REPO / "launch"))
    from mtlora_dist.engine.console import _Redacting

    import _cli

    err = RuntimeError(f"could not read s3://{KEY}:{SECRET}@bucket/x")
    assert _cli.failure_message(err) == "could not read s3://***@bucket/x"
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "reading %s", (f"s3://{KEY}@b/x",), None)
    assert KEY not in _Redacting("%(message)s").format(record)


# -- items 5 and 8: wrong credentials, a bucket that does not exist ------------------------------------------
S3_FAST = ["data.storage.retries=0", "data.storage.read_retries=1", "data.storage.retry_delay_s=0.05"]


@pytest.mark.parametrize("where", ["run_dir", "data"])
def test_wrong_credentials_are_one_line_naming_the_url(tmp_path, s3_bucket, where):
    args = [f"run_dir=s3://{s3_bucket}/run"] if where == "run_dir" else [
        f"data.train_url=s3://{s3_bucket}/pascal/train", f"data.val_url=s3://{s3_bucket}/pascal/val",
        "data=pascal_context", f"run_dir={tmp_path / 'run'}"]  # fmt: skip
    proc = run([script("train.py"), *TINY, *S3_FAST, *args], tmp_path, env={"AWS_SECRET_ACCESS_KEY": "NotTheSecret9d1"})
    assert_one_line_exit_2(proc, f"s3://{s3_bucket}/", "refused", "AWS_SECRET_ACCESS_KEY", "endpoint http://127.0.0.1")
    assert "NotTheSecret9d1" not in output(proc)


@pytest.mark.parametrize("where", ["run_dir", "data", "convert"])
def test_a_missing_bucket_names_the_url_the_endpoint_and_how_to_create_it(tmp_path, s3_server, where):
    if where == "convert":
        args = [script("convert.py"), "pascal_context", "--root", str(tmp_path), "--split", "train",
                "--out", "s3://no-such-bucket/pascal/train"]  # fmt: skip
    elif where == "run_dir":
        args = [script("train.py"), *TINY, *S3_FAST, "run_dir=s3://no-such-bucket/run"]
    else:
        args = [script("train.py"), *TINY, *S3_FAST, "data=pascal_context", f"run_dir={tmp_path / 'run'}",
                "data.train_url=s3://no-such-bucket/train", "data.val_url=s3://no-such-bucket/val"]  # fmt: skip
    started = time.monotonic()
    proc = run(args, tmp_path, timeout=120)
    assert_one_line_exit_2(
        proc, "s3://no-such-bucket/", "does not exist", s3_server.endpoint, "mkdir('no-such-bucket')"
    )
    assert time.monotonic() - started < 30  # before the model is built (it took ~34 s before)


def test_the_create_bucket_hint_works(tmp_path, s3_server):
    """The command the message suggests creates the bucket with the same AWS_* variables (no aws CLI)."""
    from mtlora_dist.storage.buckets import create_bucket_hint

    command = create_bucket_hint("made-by-hint").split("set): ", 1)[1].split(" (or ", 1)[0]
    proc = subprocess.run(command, shell=True, env={**os.environ, **s3_server.env}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    ok = run([script("train.py"), "run_dir=s3://made-by-hint/run", "--cfg", "job"], tmp_path)
    assert ok.returncode == 0, output(ok)[-2000:]
    from mtlora_dist.storage.buckets import require_buckets

    require_buckets({"run_dir": "s3://made-by-hint/run"})


# -- item 7 (and issue 33 item 16): a config.yaml with a python tag ----------------------------------------------
@pytest.mark.parametrize("entry", ["eval.py", "export.py", "train.py"])
def test_a_python_tag_in_a_runs_config_is_one_line_naming_the_runs_file(tmp_path, entry):
    """eval and export named a deleted temporary copy; a resume overwrote the file without reading it."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    recipe = (REPO / "configs" / "quickstart.yaml").read_text()
    saved = recipe + "seed: !!python/object/apply:os.getcwd []\n"
    (run_dir / "config.yaml").write_text(saved)
    args = {"eval.py": [f"checkpoint={run_dir}"], "export.py": [f"checkpoint={run_dir}", f"out={tmp_path / 'x'}"],
            "train.py": [*TINY, f"run_dir={run_dir}", f"data.synthetic.root={tmp_path / 'data'}"]}[entry]  # fmt: skip
    proc = run([script(entry), *args], tmp_path)
    assert_one_line_exit_2(proc, f"{run_dir / 'config.yaml'} is not plain YAML", "python/object/apply")
    assert "mtlora-config-" not in output(proc)
    assert (run_dir / "config.yaml").read_text() == saved  # the resume left it as it was


# -- issue 33 item 17: checkpoint.resume=false on a used run_dir ------------------------------------------------
def _earlier_run(fs, root: str) -> None:
    """What a 12-step run leaves: two checkpoints and 12 rows of metrics."""
    for tag in ("step_00000006", "step_00000012"):
        fs.pipe(f"{root}/checkpoints/{tag}/COMPLETE.json", b"{}")
    fs.pipe(f"{root}/metrics.jsonl", "".join(f'{{"step": {s}, "split": "train"}}\n' for s in range(1, 13)).encode())
    fs.pipe(f"{root}/notes.txt", b"the user's own file")


def test_resume_false_on_a_used_run_dir_is_refused(tmp_path):
    import fsspec

    run_dir = tmp_path / "run"
    _earlier_run(fsspec.filesystem("file", auto_mkdir=True), str(run_dir))
    before = (run_dir / "metrics.jsonl").read_text()
    refused = run([script("train.py"), *TINY, f"run_dir={run_dir}", "checkpoint.resume=false"], tmp_path)
    assert_one_line_exit_2(refused, "checkpoints step_00000006, step_00000012 and 12 rows of metrics.jsonl",
                           "new run_dir=", "checkpoint.overwrite=true")  # fmt: skip
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_overwrite_removes_the_earlier_run_before_training(trained):
    """The trained run below was started with checkpoint.resume=false checkpoint.overwrite=true on a folder
    holding an earlier 12-step run: only the new run's files are left, and the user's own file."""
    run_dir, proc = trained
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000002"]
    assert _steps(run_dir) == [1, 2]
    assert (run_dir / "notes.txt").exists()
    assert "removed the earlier run's" in proc.stderr


def test_resume_false_on_a_used_s3_run_dir_is_refused_and_overwrite_removes_it(s3_bucket):
    from mtlora_dist.config import ConfigError, load_config
    from mtlora_dist.engine.run_dir import check_run_dir
    from mtlora_dist.storage.fs import url_to_fs

    run_dir = f"s3://{s3_bucket}/runs/x"
    fs, root = url_to_fs(run_dir)
    _earlier_run(fs, root)
    cfg = load_config(None, [f"run_dir={run_dir}", "checkpoint.resume=false"])
    with pytest.raises(ConfigError, match="holds an earlier run .checkpoints step_00000006, step_00000012 and 12"):
        check_run_dir(cfg)
    check_run_dir(load_config(None, [f"run_dir={run_dir}"]))  # resuming it is fine
    with pytest.raises(ConfigError, match="pass it together with checkpoint.resume=false"):
        check_run_dir(load_config(None, [f"run_dir={run_dir}", "checkpoint.overwrite=true"]))
    check_run_dir(load_config(None, [f"run_dir={run_dir}", "checkpoint.resume=false", "checkpoint.overwrite=true"]))
    fs.invalidate_cache()
    assert fs.find(root) == [f"{root}/notes.txt"]
    check_run_dir(cfg)  # a fresh run_dir now


# -- item 6: model.pretrained that is not a Swin state dict -----------------------------------------------------
class _Code:
    """Unpickling this would create a folder: stands in for code hidden in a weights file."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.makedirs, (self.target,))


def _text_file(path: Path) -> None:
    path.write_text("these are not weights\n")


def _resnet(path: Path) -> None:
    import torch
    import torchvision

    torch.save(torchvision.models.resnet18().state_dict(), path)


def _pickle_with_code(path: Path) -> None:
    import torch

    torch.save({"model": _Code(str(path.parent / "pwned"))}, path)


@pytest.mark.parametrize("make", [_text_file, _resnet, _pickle_with_code], ids=["text", "resnet", "pickle-code"])
def test_a_pretrained_file_that_is_not_swin_weights_is_one_line(tmp_path, make):
    weights = tmp_path / "weights.pth"
    make(weights)
    proc = run([script("train.py"), *TINY, f"model.pretrained={weights}", f"run_dir={tmp_path / 'run'}",
                f"data.synthetic.root={tmp_path / 'data'}", "logging.wandb.enabled=false"], tmp_path)  # fmt: skip
    assert_one_line_exit_2(proc, f"pretrained checkpoint '{weights}'", "model.pretrained")
    assert "weights_only=False" not in output(proc)
    assert not (tmp_path / "pwned").exists()


# -- item 11: threads per rank ---------------------------------------------------------------------------------
@pytest.mark.parametrize("omp", [None, "3"], ids=["chosen", "from-OMP_NUM_THREADS"])
def test_threads_per_rank_are_chosen_from_the_cpus_and_logged(tmp_path, omp):
    from mtlora_dist.cpus import cpu_budget

    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if omp:
        env["OMP_NUM_THREADS"] = omp
    proc = subprocess.run([sys.executable, script("train.py"), *TINY, "data.num_workers=1", "max_steps=1",
                           f"run_dir={tmp_path / 'run'}", f"data.synthetic.root={tmp_path / 'd'}",
                           "logging.wandb.enabled=false"], cwd=tmp_path, capture_output=True, text=True,
                          env={**env, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline"}, timeout=300)  # fmt: skip
    assert proc.returncode == 0, output(proc)[-3000:]
    if omp:
        assert f"CPU budget: OMP_NUM_THREADS={omp} + data.num_workers=1 per rank" in proc.stdout
    else:
        expected = cpu_budget(1, cpus=len(os.sched_getaffinity(0)), local_ranks=1, omp_threads=None).threads
        line = f"CPU budget: {expected} torch thread(s) + data.num_workers=1 per rank"
        assert line in proc.stdout, proc.stdout[-3000:]


def test_ranks_times_threads_and_workers_fit_the_cpus():
    from mtlora_dist.cpus import cpu_budget

    def threads(workers, cpus, local_ranks):
        return cpu_budget(workers, cpus=cpus, local_ranks=local_ranks, omp_threads=None).threads

    assert threads(1, cpus=2, local_ranks=1) == 1  # the quickstart on 2 cores
    assert threads(0, cpus=2, local_ranks=1) == 2
    assert threads(2, cpus=16, local_ranks=2) == 6  # 2 x (6 + 2) = 16
    assert threads(None, cpus=16, local_ranks=8) == 1
    assert threads(4, cpus=2, local_ranks=2) == 1  # never 0


# -- item 14: every offline wandb folder of a resumed run is named ---------------------------------------------
@pytest.mark.integration
def test_the_closing_wandb_sync_line_covers_every_job_of_the_run(tmp_path):
    import glob

    run_dir = tmp_path / "run"
    args = [script("train.py"), *TINY, "steps_per_job=1", f"run_dir={run_dir}", f"data.synthetic.root={tmp_path / 'd'}",
            "logging.wandb.enabled=true", "logging.wandb.mode=offline"]  # fmt: skip
    for _ in range(2):
        proc = run(args, tmp_path)
        assert proc.returncode == 0, output(proc)[-3000:]
        time.sleep(1.1)  # offline folders are named by the second they start
    line = next(x for x in output(proc).splitlines() if "upload them all with: wandb sync " in x)
    pattern = line.split("wandb sync ", 1)[1].strip()
    assert len(glob.glob(pattern)) == 2 and all(p.startswith(str(run_dir / "wandb")) for p in glob.glob(pattern))


# -- issue 33 items 22 and 23: one trained run, then what a user sees around it ----------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A 2-step tiny run (its output too), started over an earlier run with checkpoint.overwrite=true: the run
    the overwrite, eval, export and summary checks look at."""
    import fsspec

    root = tmp_path_factory.mktemp("trained")
    _earlier_run(fsspec.filesystem("file", auto_mkdir=True), str(root / "run"))  # overwritten (item 17)
    proc = run([script("train.py"), *TINY, f"run_dir={root / 'run'}", f"data.synthetic.root={root / 'data'}",
                "data.synthetic.num_train=8", "data.synthetic.num_val=8", "logging.wandb.enabled=true",
                "logging.wandb.mode=offline", "checkpoint.resume=false", "checkpoint.overwrite=true"], root)  # fmt: skip
    assert proc.returncode == 0, output(proc)[-3000:]
    return root / "run", proc


def test_a_run_says_its_checkpoints_and_ends_with_its_outputs_and_total_time(trained):
    run_dir, proc = trained
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert f"checkpoint of step 2 written to {run_dir}/checkpoints/step_00000002" in proc.stdout
    assert "wandb sync " in proc.stdout  # still said, no longer the last line
    last = lines[-1]
    assert re.search(r"done: step 2 of 2 in \d+:\d\d:\d\d; outputs: ", last), last
    for part in (f"{run_dir}/checkpoints/step_00000002", f"{run_dir}/metrics.jsonl", f"{run_dir}/reports/"):
        assert part in last, last


# launch/eval.py as a terminal starts it, with its first batch held for two minutes (it says so first), so the
# Ctrl-C lands inside the evaluation loop every time (the whole tiny evaluation takes under a second). A
# terminal's foreground job has SIGINT at its default, which Python turns into KeyboardInterrupt; a test
# suite started in the background of a non-interactive shell hands its children SIGINT *ignored*, which Python
# keeps (so does eval.py, as nohup'd jobs expect): set the default here, as the terminal would have.
_EVAL_WITH_A_SLOW_BATCH = (
    "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "import os, runpy, sys, time; sys.path.insert(0, sys.argv[1]); import mtlora_dist.engine.evaluate as ev; "
    "real = ev.to_device; "
    "ev.to_device = lambda *a, **k: (print('first batch held', flush=True), time.sleep(120), real(*a, **k))[2]; "
    "sys.argv = sys.argv[2:]; sys.path.insert(0, os.path.dirname(sys.argv[0])); "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


def test_ctrl_c_during_eval_is_one_line_and_exit_130(trained, tmp_path):
    run_dir, _ = trained
    log_file = tmp_path / "eval.log"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-c", _EVAL_WITH_A_SLOW_BATCH, str(REPO), script("eval.py"), f"checkpoint={run_dir}",
           f"out={tmp_path / 'e'}"]  # fmt: skip
    with open(log_file, "w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 240
    while "first batch held" not in log_file.read_text():  # inside the evaluation loop
        assert proc.poll() is None and time.monotonic() < deadline, log_file.read_text()[-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole foreground group
    assert proc.wait(timeout=120) == 130, log_file.read_text()[-3000:]
    text = log_file.read_text()
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    assert len(re.findall(r"^stopped: Ctrl-C \(SIGINT\) interrupted eval.py", text, re.MULTILINE)) == 1, text


def test_export_prints_its_results_on_stdout(trained, tmp_path):
    run_dir, _ = trained
    proc = run([script("export.py"), f"checkpoint={run_dir}", f"out={tmp_path / 'x'}"], tmp_path)
    assert proc.returncode == 0, output(proc)[-3000:]
    assert str(tmp_path / "x") in proc.stdout
    assert "[" not in proc.stderr, proc.stderr[-3000:]  # no log line of ours on stderr


def test_wrong_credentials_in_eval_name_the_checkpoint_url(tmp_path, s3_bucket):
    proc = run([script("eval.py"), f"checkpoint=s3://{s3_bucket}/runs/x"], tmp_path,
               env={"AWS_SECRET_ACCESS_KEY": "NotTheSecret9d1"})  # fmt: skip
    assert_one_line_exit_2(proc, f"checkpoint s3://{s3_bucket}/runs/x", "refused", "AWS_SECRET_ACCESS_KEY")
    assert "NotTheSecret9d1" not in output(proc)


def test_a_missing_pretrained_file_is_refused_with_the_config(tmp_path):
    proc = run([script("train.py"), *TINY, f"model.pretrained={tmp_path / 'no.pth'}", f"run_dir={tmp_path / 'r'}"],
               tmp_path)  # fmt: skip
    assert_one_line_exit_2(proc, f"model.pretrained '{tmp_path / 'no.pth'}' does not exist")
    assert "torch threads per rank" not in output(proc)  # before training's set-up (torch, the model)


def test_a_gpu_recipe_on_a_cpu_says_what_it_will_cost_first(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(REPO / "launch"))
    from mtlora_dist.config import load_config
    from mtlora_dist.engine.console import cpu_cost

    import _cli

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert cpu_cost(load_config(None, [])) is None  # the quickstart: no notice
    recipe = str(REPO / "configs" / "pascal_swin_t_r64.yaml")
    cfg = load_config(recipe, ["data=synthetic", f"run_dir={tmp_path / 'r'}"])
    _cli.prepare_training(cfg)
    said = capsys.readouterr().out
    # the measured run it is scaled from (issue 33): 14.6 GB, 30-40 s a step, 7,200 steps, an ETA of 3 days
    assert re.search(r"about 14.6 GB of memory.* and 35 s an optimizer step; 7200 steps: about 2.9 days", said), said
