"""``manifest.json``: what a folder of shards holds, written last by the converter.

The streaming loader plans every epoch from it without listing the bucket (sample counts per shard
give equal batch counts per rank and let a resumed run skip exactly), and compares what it reads
against it (a tar cut at a header boundary ends silently; only the count tells).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from mtlora_dist.data.errors import DataError
from mtlora_dist.data.shards.encoding import ENCODING_VERSION
from mtlora_dist.storage.fs import StorageOptions, join, url_to_fs
from mtlora_dist.storage.retry import retry_call

__all__ = [
    "MANIFEST_NAME",
    "FORMAT",
    "DIGEST_HEX",
    "ShardInfo",
    "dumps_with_shards",
    "Manifest",
    "manifest_url",
    "read_manifest",
    "verify_shards",
]

MANIFEST_NAME = "manifest.json"
FORMAT = "mtlora-dist/webdataset"
DIGEST_HEX = 16  # hex digits of sha256 kept per sample: catches damage, not an adversary (the shard's is whole)


@dataclass(frozen=True)
class ShardInfo:
    """One shard; ``offsets``/``digests`` are its per-sample index (``shard_index``), empty in manifests
    written before it existed: sample ``i`` is bytes ``offsets[i]:offsets[i + 1]`` of the tar (its members'
    headers and padded data), whose sha256 starts with ``digests[i * DIGEST_HEX:(i + 1) * DIGEST_HEX]``."""

    name: str  # file name relative to the manifest's folder
    num_samples: int
    bytes: int
    sha256: str
    offsets: list[int] = field(default_factory=list)
    digests: str = ""

    @property
    def indexed(self) -> bool:
        return bool(self.offsets)

    def sample_digest(self, index: int) -> str:
        return self.digests[index * DIGEST_HEX : (index + 1) * DIGEST_HEX]

    def index_problem(self) -> str | None:
        """What is wrong with the index, if anything (a hand-edited or truncated manifest)."""
        n, offsets = self.num_samples, self.offsets
        if len(offsets) != n + 1 or len(self.digests) != DIGEST_HEX * n:
            return f"{len(offsets)} offsets and {len(self.digests) // DIGEST_HEX} digests for {n} samples"
        if any(b <= a for a, b in zip(offsets, offsets[1:])) or offsets[0] < 0 or offsets[-1] > self.bytes:
            return f"offsets not increasing within the shard's {self.bytes} bytes"
        return None


@dataclass
class Manifest:
    dataset: str
    split: str
    tasks: list[str]
    num_outputs: dict[str, int]
    class_names: dict[str, list[str]]
    encodings: dict[str, str]
    shards: list[ShardInfo]
    optional_tasks: list[str] = field(default_factory=list)  # tasks some samples have no label for
    labels_missing: dict[str, int] = field(default_factory=dict)  # per task: samples without its label
    encoding_version: int = ENCODING_VERSION
    format: str = FORMAT
    base_url: str = field(default="", compare=False)  # where it was read from; not stored

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def indexed(self) -> bool:
        """Every shard has its per-sample index: readers read just the samples they need."""
        return all(s.indexed for s in self.shards)

    def shard_url(self, index: int) -> str:
        return join(self.base_url, self.shards[index].name)

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("base_url")
        data["num_samples"] = self.num_samples
        return dumps_with_shards(data)

    @classmethod
    def from_json(cls, text: str, base_url: str = "") -> Manifest:
        data = json.loads(text)
        if data.get("format") != FORMAT:
            raise DataError(f"{base_url}: not an {FORMAT} manifest (format={data.get('format')!r})")
        if data.get("encoding_version") != ENCODING_VERSION:
            raise DataError(
                f"{base_url}: shards use encoding version {data.get('encoding_version')}, this code reads "
                f"version {ENCODING_VERSION}; re-run launch/convert.py with this version"
            )
        total = data.pop("num_samples", None)
        data["shards"] = [ShardInfo(**s) for s in data["shards"]]
        manifest = cls(**data, base_url=base_url)
        for shard in manifest.shards:
            problem = shard.indexed and shard.index_problem()
            if problem:
                raise DataError(
                    f"{base_url}: the per-sample index of shard {shard.name} is broken ({problem}); rebuild it "
                    "with launch/convert.py --index --out URL"
                )
        if total is not None and total != manifest.num_samples:
            raise DataError(f"{base_url}: manifest total {total} != sum of shard counts {manifest.num_samples}")
        return manifest


def dumps_with_shards(data: dict[str, Any]) -> str:
    """JSON of a record holding ``shards`` (a manifest, a conversion journal): indented, but a line per
    shard, whose index lists a number per sample."""
    text = json.dumps({**data, "shards": []}, indent=1, sort_keys=True)
    rows = ",\n  ".join(json.dumps(s, sort_keys=True) for s in data["shards"])
    return text.replace('"shards": []', f'"shards": [\n  {rows}\n ]', 1) + "\n"


def manifest_url(url: str) -> tuple[str, str]:
    """``(folder, manifest file)`` for a folder URL or a URL of the manifest itself."""
    url = str(url).rstrip("/")
    if url.endswith(".json"):
        return url.rpartition("/")[0], url
    return url, join(url, MANIFEST_NAME)


def read_manifest(url: str, storage: StorageOptions | None = None) -> Manifest:
    """Read the manifest of the shard folder ``url`` (local, ``file://`` or ``s3://``), with retries."""
    folder, path_url = manifest_url(url)
    fs, path = url_to_fs(path_url, storage)

    def read() -> bytes:
        return fs.cat_file(path)

    try:
        text = retry_call(read, url=path_url, options=storage).decode()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no {MANIFEST_NAME} at {path_url}: point the loader at a folder written by launch/convert.py "
            "(the manifest is written last, so a missing one can also mean the conversion did not finish)"
        ) from None
    except PermissionError as exc:
        raise PermissionError(
            f"access denied reading {path_url} ({exc}): check the credentials (AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY or StorageOptions) and the bucket's permissions"
        ) from None
    return Manifest.from_json(text, base_url=folder)


def sha256_file(fs: Any, path: str, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_shards(manifest: Manifest, storage: StorageOptions | None = None) -> list[str]:
    """Names of shards whose size or sha256 differs from the manifest (full read of every shard)."""
    bad = []
    for i, shard in enumerate(manifest.shards):
        fs, path = url_to_fs(manifest.shard_url(i), storage)
        try:
            ok = fs.size(path) == shard.bytes and sha256_file(fs, path) == shard.sha256
        except FileNotFoundError:
            ok = False
        if not ok:
            bad.append(shard.name)
    return bad
