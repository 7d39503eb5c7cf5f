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


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A running S3 server for the whole session; its client variables are exported."""
    backend = os.environ.get("MTLORA_TEST_S3", "rclone")
    server = S3Server(backend, tmp_path_factory.mktemp("s3") / "data").start()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket per test, named after the test."""
    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    s3_server.make_bucket(name)
    return name
