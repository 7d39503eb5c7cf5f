"""Check, before anything is built, that the buckets a run reads and writes exist and that the credentials
may use them: a missing bucket or a refused key is one message naming the URL, the endpoint and the fix,
seconds after start-up instead of a bare ``The specified bucket does not exist`` or a botocore traceback
after the model is built. Buckets are never created here: which region, policy and lifecycle they get is
the owner's choice."""

from __future__ import annotations

from mtlora_dist.storage.fs import StorageOptions, describe_endpoint, is_remote, redact_userinfo, url_to_fs
from mtlora_dist.storage.retry import is_transient

__all__ = ["StorageAccessError", "require_buckets", "create_bucket_hint"]


class StorageAccessError(RuntimeError):
    """A bucket that does not exist, or credentials that the object store refuses."""


def create_bucket_hint(bucket: str) -> str:
    """How to create a bucket without the aws CLI (s3fs is installed with this package)."""
    return (
        f'create it first (with the same AWS_* variables set): python -c "import s3fs; '
        f"s3fs.S3FileSystem().mkdir('{bucket}')\" (or your store's console / `rclone mkdir remote:{bucket}`)"
    )


def require_buckets(urls: dict[str, str | None], storage: StorageOptions | None = None) -> None:
    """For every ``s3://`` URL in ``urls`` (``what -> url``, e.g. ``{"run_dir": ...}``): its bucket exists and
    the credentials are accepted. An unreachable endpoint is left to the callers' retries and messages."""
    for what, url in urls.items():
        if url and is_remote(url):
            _check_bucket(what, url, storage)


def _check_bucket(what: str, url: str, storage: StorageOptions | None) -> None:
    fs, path = url_to_fs(url, storage)
    bucket = path.split("/", 1)[0]
    where = f"{what} {redact_userinfo(url)} at {describe_endpoint(storage)}"
    try:
        _probe(fs, path)
    except FileNotFoundError:
        raise StorageAccessError(
            f"the bucket '{bucket}' of {where} does not exist; {create_bucket_hint(bucket)}"
        ) from None
    except PermissionError as err:
        raise StorageAccessError(
            f"access to the bucket '{bucket}' of {where} was refused ({err}); check AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY (or data.storage.key/secret in a config file) and the bucket's permissions"
        ) from None
    except Exception as err:  # noqa: BLE001 - unreachable: the readers' retries report it with their own message
        if not is_transient(err):
            raise


def _probe(fs, path: str) -> None:
    """HeadBucket, or where a policy grants only a prefix (no HeadBucket), a one-key listing of the prefix:
    what the run itself does first. Raises FileNotFoundError / PermissionError as s3fs maps them."""
    bucket, _, key = path.partition("/")
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except PermissionError:
        fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=key.rstrip("/") + "/", MaxKeys=1)
