"""Shared fixtures: a real S3-compatible server on loopback, and a quiet, offline environment."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ helpers importable as modules
os.environ.setdefault("WANDB_MODE", "offline")
if not __import__("torch").cuda.is_available():  # a GPU machine must get DeepSpeed's CUDA accelerator
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from s3_server import S3Server  # noqa: E402


def _restore_environment(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def single_rank_group():
    """A one-rank gloo process group in the test process (DeepSpeed engines need one), reused if one
    exists, then undone with the environment it set."""
    import socket

    import deepspeed
    import deepspeed.ops
    import torch.distributed as dist

    from mtlora_dist import comm

    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    created, saved = not dist.is_initialized(), {k: os.environ.get(k) for k in names}
    if created:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no JIT build of the CPU shm op
        deepspeed.init_distributed(dist_backend="gloo")
    yield
    if created:
        comm.shutdown()  # DeepSpeed's cached groups too: the next module's engine must not meet them
    _restore_environment(saved)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A running S3 server for the whole session; its client variables are exported."""
    backend = os.environ.get("MTLORA_TEST_S3", "rclone")
    server = S3Server(backend, tmp_path_factory.mktemp("s3") / "data").start()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    yield server
    server.stop()
    _restore_environment(saved)


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket per test, named after the test."""
    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    s3_server.make_bucket(name)
    return name
