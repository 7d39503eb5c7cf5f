"""Known failures end with one message and exit status 2, never a traceback: an unreachable S3 endpoint for
the data or for an s3:// run_dir (plain python and the deepspeed launcher), and a checkpoint written with
another configuration (named by its config keys). Bugs still raise with their traceback."""

from __future__ import annotations

import sys

import pytest
from runs import deepspeed_launcher

from cli_utils import FAST_FAIL, REPO, TINY, output, run, script
from s3_server import free_port

sys.path.insert(0, str(REPO / "launch"))
from mtlora_dist.checkpoint import CheckpointMismatchError  # noqa: E402
from mtlora_dist.config import ConfigError  # noqa: E402
from mtlora_dist.data.errors import ShardError  # noqa: E402
from mtlora_dist.storage.retry import StorageUnavailableError  # noqa: E402

import _cli  # noqa: E402


def unreachable_env() -> dict[str, str]:
    """An S3 endpoint on a loopback port nobody listens on."""
    return {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def assert_one_message(proc, *expected: str) -> None:
    text = output(proc)
    assert proc.returncode == 2, text[-3000:]
    assert "Traceback" not in text and "[rank0]:" not in text, text[-3000:]
    for part in expected:
        assert part in proc.stderr, (part, proc.stderr[-3000:])


# -- classification, in process ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "err, kind",
    [
        (ConfigError("x"), "config"),
        (FileNotFoundError("x"), "config"),
        (CheckpointMismatchError("x"), "checkpoint"),
        (ShardError("x"), "data"),
        (StorageUnavailableError("x"), "data"),
        (KeyError("x"), None),
        (RuntimeError("x"), None),
    ],
)
def test_known_failures_are_told_from_bugs(err, kind):
    assert _cli.known_failure(err) == kind


def test_a_dataloader_workers_error_keeps_its_message_not_the_workers_traceback():
    text = (
        "Caught StorageUnavailableError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n    raise StorageUnavailableError(msg)\n'
        "mtlora_dist.storage.retry.StorageUnavailableError: could not read s3://b/x after 2 attempt(s); check it"
    )
    assert _cli.failure_message(StorageUnavailableError(text)) == "could not read s3://b/x after 2 attempt(s); check it"


@pytest.mark.parametrize(
    "rank, err, printed",
    [
        ("0", ConfigError("bad key"), "error: bad key\n"),
        ("1", ConfigError("bad key"), ""),  # the same on every rank: rank 0 says it
        ("1", ShardError("shard 3 is truncated"), "error (rank 1): shard 3 is truncated\n"),
    ],
)
def test_one_message_per_job(rank, err, printed, monkeypatch, capsys):
    monkeypatch.setenv("RANK", rank)

    @_cli.friendly_errors
    def main():
        raise err

    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2 and capsys.readouterr().err == printed


def test_a_bug_keeps_its_traceback():
    @_cli.friendly_errors
    def main():
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        main()


# -- real runs ----------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_an_unreachable_data_endpoint_is_one_message(tmp_path):
    proc = run(
        [
            script("train.py"),
            *TINY,
            *FAST_FAIL,
            f"run_dir={tmp_path / 'run'}",
            "data.train_url=s3://nowhere/train",
            "data.val_url=s3://nowhere/val",
        ],
        tmp_path,
        env=unreachable_env(),
    )
    assert_one_message(proc, "error: could not read s3://nowhere/train", "127.0.0.1", "check that the S3 server")


@pytest.mark.integration
def test_an_unreachable_s3_run_dir_is_one_message(tmp_path):
    proc = run(
        [script("train.py"), *TINY, *FAST_FAIL, "run_dir=s3://nowhere/run", f"data.synthetic.root={tmp_path / 'data'}"],
        tmp_path,
        env=unreachable_env(),
    )
    assert_one_message(proc, "error: could not read s3://nowhere/run", "127.0.0.1", "check that the S3 server")


@pytest.mark.integration
def test_an_unreachable_data_endpoint_under_the_deepspeed_launcher(tmp_path):
    launcher = deepspeed_launcher()
    proc = run(
        [
            script("train.py"),
            *TINY,
            *FAST_FAIL,
            f"run_dir={tmp_path / 'run'}",
            "data.num_workers=1",
            "data.train_url=s3://nowhere/train",
            "data.val_url=s3://nowhere/val",
        ],
        tmp_path,
        env=unreachable_env(),
        python=launcher,
    )
    assert_one_message(proc, "error: could not read s3://nowhere/train", "error (rank 1): could not read")


@pytest.mark.integration
def test_a_checkpoint_of_another_config_names_the_keys_that_differ(tmp_path):
    run_dir = tmp_path / "run"
    common = [*TINY, f"run_dir={run_dir}", f"data.synthetic.root={tmp_path / 'data'}"]
    first = run([script("train.py"), *common], tmp_path)
    assert first.returncode == 0, output(first)[-3000:]

    resumed = run([script("train.py"), *common, "max_steps=4", "adapter.shared_rank=4"], tmp_path)
    assert_one_message(resumed, "adapter.shared_rank: 8 in the run, 4 here", "start a new run_dir")
    assert "adapter.dropout" not in resumed.stderr  # only what differs

    evaluated = run(
        [script("eval.py"), f"checkpoint={run_dir}", "adapter.task_rank=2", f"out={tmp_path / 'eval'}"], tmp_path
    )
    assert_one_message(evaluated, "adapter.task_rank: 4 in the run, 2 here")


def test_cli_keys_are_separated_from_config_overrides():
    args = ["checkpoint=s3://b/r", "seed=3", "out=x=y", "data.batch_size=2"]
    extra, rest = _cli.split_cli_keys(args, ("checkpoint", "out"))
    assert extra == {"checkpoint": "s3://b/r", "out": "x=y"} and rest == ["seed=3", "data.batch_size=2"]
