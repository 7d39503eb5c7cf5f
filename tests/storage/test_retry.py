"""Retry policy: what is transient, backoff, and the message when retries run out."""

from __future__ import annotations

import botocore.exceptions
import pytest

from mtlora_dist.storage.fs import StorageOptions
from mtlora_dist.storage.retry import StorageUnavailableError, backoff_delays, is_transient, retry_call


def test_transient_or_not():
    endpoint = botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:9")
    assert not isinstance(endpoint, OSError) and is_transient(endpoint)  # not an OSError, still a network error
    assert is_transient(ConnectionResetError()) and is_transient(TimeoutError()) and is_transient(OSError("5xx"))
    assert not is_transient(FileNotFoundError("gone")) and not is_transient(PermissionError("403"))
    assert not is_transient(botocore.exceptions.NoCredentialsError())
    assert not is_transient(ValueError("bad data")) and not is_transient(KeyError("x"))


def test_backoff_doubles_and_is_capped():
    assert backoff_delays(5, 1.0, cap_s=6.0) == [1.0, 2.0, 4.0, 6.0, 6.0]
    assert backoff_delays(0, 1.0) == []


def test_retry_call_recovers_after_transient_failures():
    calls, slept, seen = [], [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionRefusedError("down")
        return "ok"

    options = StorageOptions(read_retries=4, retry_delay_s=0.5)
    result = retry_call(
        flaky, url="s3://b/k", options=options, sleep=slept.append, on_retry=lambda n, exc: seen.append(n)
    )
    assert result == "ok" and len(calls) == 3 and slept == [0.5, 1.0] and seen == [1, 2]


def test_retry_call_gives_up_with_a_message_naming_url_and_checks(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:7777")
    slept = []

    def down():
        raise botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:7777")

    with pytest.raises(StorageUnavailableError) as err:
        retry_call(
            down,
            url="s3://bucket/shards/x.tar",
            options=StorageOptions(read_retries=2, retry_delay_s=0.1),
            sleep=slept.append,
        )
    message = str(err.value)
    assert "s3://bucket/shards/x.tar" in message and "after 3 attempt(s)" in message
    assert "endpoint http://127.0.0.1:7777 ($AWS_ENDPOINT_URL)" in message and "credentials" in message
    assert slept == [0.1, 0.2]


def test_permanent_errors_are_not_retried():
    slept = []

    def missing():
        raise FileNotFoundError("no such key")

    with pytest.raises(FileNotFoundError):
        retry_call(missing, url="s3://b/k", options=StorageOptions(read_retries=5), sleep=slept.append)
    assert slept == []
