"""Sample encoding in tar members: round trip, determinism, and safe failure on corrupt data (every
decoder error a ``SampleDecodeError`` naming the shard, the sample and the member)."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import webdataset as wds

from mtlora_dist.data.errors import SampleDecodeError
from mtlora_dist.data.ingest.formats import get_reader
from mtlora_dist.data.shards.encoding import Decoders, check_png, decode_sample, encode_sample, member_suffix
from mtlora_dist.data.shards.manifest import read_manifest
from mtlora_dist.data.shards.tarshards import TarShardWriter, iter_tar_samples

from datatest_utils import NYUD_TASKS, PASCAL_TASKS

DECODERS = [Decoders("simplejpeg", "pyspng"), Decoders("pil", "pil")]
DEFAULT_DECODERS = Decoders()


def _round_trip(reader, tasks, decoders=DEFAULT_DECODERS):
    sample_id = reader.ids("train")[1]
    sample = reader.read(sample_id)
    members = encode_sample(sample, tasks)
    assert [m for m, _ in members] == ["jpg"] + [member_suffix(t) for t in tasks]
    assert members == encode_sample(sample, tasks)  # deterministic bytes
    decoded = decode_sample(sample_id, dict(members), tasks, decoders=decoders)
    return sample, decoded


@pytest.mark.parametrize("decoders", DECODERS, ids=lambda d: d.jpeg)
def test_pascal_round_trip(pascal_root, decoders):
    sample, decoded = _round_trip(get_reader("pascal_context", pascal_root), PASCAL_TASKS, decoders)
    for task in ("semseg", "human_parts", "sal", "edge"):
        assert decoded[task].dtype == np.uint8
        np.testing.assert_array_equal(decoded[task], sample[task])
    assert np.abs(decoded["normals"] - sample["normals"]).max() < 1e-3  # float16
    np.testing.assert_array_equal(decoded["normals"] == 0, sample["normals"] == 0)  # invalid stays exactly 0
    assert np.abs(decoded["image"].astype(int) - sample["image"]).mean() < 3


def test_nyud_round_trip_keeps_depth_exact(nyud_root):
    sample, decoded = _round_trip(get_reader("nyud", nyud_root), NYUD_TASKS)
    assert decoded["depth"].dtype == np.float32
    np.testing.assert_array_equal(decoded["depth"], sample["depth"])
    np.testing.assert_array_equal(decoded["semseg"], sample["semseg"])


def test_source_jpeg_is_stored_unchanged(pascal_root):
    reader = get_reader("pascal_context", pascal_root, ["sal"])
    sample_id = reader.ids("train")[0]
    source = open(reader.image_path(sample_id), "rb").read()
    members = dict(encode_sample(reader.read(sample_id), ["sal"], source_jpeg=source))
    assert members["jpg"] == source
    members = dict(encode_sample(reader.read(sample_id), ["sal"], source_jpeg=b"not a jpeg"))
    assert members["jpg"] != source and members["jpg"].startswith(b"\xff\xd8")


def _png_members(pascal_root):
    reader = get_reader("pascal_context", pascal_root, ["semseg"])
    sample_id = reader.ids("train")[0]
    return sample_id, dict(encode_sample(reader.read(sample_id), ["semseg"]))


def test_both_decoders_give_the_same_pixels(pascal_root):
    reader = get_reader("pascal_context", pascal_root, PASCAL_TASKS)
    sample_id = reader.ids("train")[2]
    members = dict(encode_sample(reader.read(sample_id), PASCAL_TASKS))
    fast, pil = (decode_sample(sample_id, members, PASCAL_TASKS, decoders=d) for d in DECODERS)
    for task in ("semseg", "human_parts", "sal", "edge"):
        np.testing.assert_array_equal(fast[task], pil[task])
    assert np.abs(fast["image"].astype(int) - pil["image"]).max() <= 2  # both libjpeg-turbo; IDCT rounding


def test_reduced_jpeg_decode_is_within_the_limits(pascal_root):
    reader = get_reader("pascal_context", pascal_root, ["semseg"])
    sample_id = reader.ids("train")[0]
    members = dict(encode_sample(reader.read(sample_id), ["semseg"]))
    h, w = reader.read(sample_id)["semseg"].shape
    small = decode_sample(sample_id, members, ["semseg"], image_min_hw=(h // 4, w // 4))
    assert h // 4 <= small["image"].shape[0] < h and w // 4 <= small["image"].shape[1] < w
    assert small["semseg"].shape == (h, w) and small["label_hw"] == (h, w)  # labels keep their size


@pytest.mark.parametrize("decoders", DECODERS, ids=lambda d: d.png)
def test_corrupt_png_is_an_exception_not_a_crash(pascal_root, decoders):
    sample_id, members = _png_members(pascal_root)
    png = members["semseg.png"]
    check_png(png)
    idat = png.index(b"IDAT") + 10
    flipped = png[:idat] + bytes([png[idat] ^ 0xFF]) + png[idat + 1 :]
    for bad, why in ((flipped, "bad CRC"), (png[: len(png) // 2], "truncated"), (b"garbage" * 10, "signature")):
        with pytest.raises(SampleDecodeError, match=why):
            check_png(bad)
        with pytest.raises(SampleDecodeError, match=f"shard s.tar sample '{sample_id}' member 'semseg.png'"):
            decode_sample(sample_id, {**members, "semseg.png": bad}, ["semseg"], shard="s.tar", decoders=decoders)


@pytest.mark.parametrize("decoders", DECODERS, ids=lambda d: d.jpeg)
def test_random_corruption_of_any_member_is_a_decode_error_naming_shard_and_sample(pascal_root, decoders):
    """Flip bytes anywhere in each member kind (JPEG, PNG, .npy header and body): decoding either
    succeeds or raises SampleDecodeError naming shard, sample and member, never anything else."""
    reader = get_reader("pascal_context", pascal_root, PASCAL_TASKS)
    sample_id = reader.ids("train")[0]
    members = dict(encode_sample(reader.read(sample_id), PASCAL_TASKS))
    rng = np.random.default_rng(7)
    failures = 0
    for member in ("jpg", "semseg.png", "normals.npy"):
        data = members[member]
        span = 128 if member == "normals.npy" else len(data)  # .npy: the header, where parsing happens
        for _ in range(120):
            corrupt = bytearray(data)
            for pos in rng.integers(0, span, size=int(rng.integers(1, 14))):
                corrupt[pos] = int(rng.integers(0, 256))
            try:
                decode_sample(
                    sample_id, {**members, member: bytes(corrupt)}, PASCAL_TASKS, shard="x/s-1.tar", decoders=decoders
                )
            except SampleDecodeError as exc:
                failures += 1
                assert f"shard x/s-1.tar sample '{sample_id}' member '{member}'" in str(exc)
    assert failures > 100  # most corruptions are caught (the rest decode to other pixels: checksums' job)


def test_bad_image_and_npy_members_are_rejected(pascal_root):
    reader = get_reader("pascal_context", pascal_root, ["normals"])
    sample_id = reader.ids("train")[0]
    members = dict(encode_sample(reader.read(sample_id), ["normals"]))
    with pytest.raises(SampleDecodeError, match="corrupt image"):
        decode_sample(sample_id, {**members, "jpg": members["jpg"][:200]}, ["normals"])
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(SampleDecodeError, match="corrupt .npy"):
        decode_sample(sample_id, {**members, "normals.npy": pickled.getvalue()}, ["normals"])
    wrong = io.BytesIO()
    np.save(wrong, np.zeros((4, 4, 3), np.float64))
    with pytest.raises(SampleDecodeError, match="expected a float16"):
        decode_sample(sample_id, {**members, "normals.npy": wrong.getvalue()}, ["normals"])
    small = io.BytesIO()
    np.save(small, np.zeros((4, 4, 3), np.float16))
    with pytest.raises(SampleDecodeError, match="the image is .* but the labels are"):
        decode_sample(sample_id, {**members, "normals.npy": small.getvalue()}, ["normals"])


def test_missing_member_names_what_is_missing(pascal_root):
    sample_id, members = _png_members(pascal_root)
    with pytest.raises(SampleDecodeError, match=r"lacks member\(s\) \['sal.png'\]"):
        decode_sample(sample_id, members, ["semseg", "sal"])


def test_tar_writer_is_deterministic_and_readable(tmp_path):
    samples = [("a_1", [("semseg.png", b"y"), ("jpg", b"x" * 700)]), ("b_2", [("jpg", b"z" * 3)])]
    paths = []
    for name in ("one.tar", "two.tar"):
        with TarShardWriter(str(tmp_path / name)) as w:
            for key, members in samples:
                w.add(key, members)
        paths.append(tmp_path / name)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    with tarfile.open(paths[0]) as tar:
        infos = tar.getmembers()
        assert [i.name for i in infos] == ["a_1.jpg", "a_1.semseg.png", "b_2.jpg"]
        assert {(i.mtime, i.uid, i.gid, i.uname, i.gname, i.mode) for i in infos} == {(0, 0, 0, "", "", 0o444)}
    with open(paths[0], "rb") as f:
        assert [(k, m) for k, m in iter_tar_samples(f)] == [
            ("a_1", {"jpg": b"x" * 700, "semseg.png": b"y"}),
            ("b_2", {"jpg": b"z" * 3}),
        ]


def test_our_shards_read_with_plain_webdataset(pascal_shards):
    """A shard we write is a standard webdataset shard: webdataset.WebDataset yields the same samples."""
    folder = pascal_shards["train"]
    manifest = read_manifest(folder)
    urls = [f"{folder}/{s.name}" for s in manifest.shards]
    ours = []
    for url in urls:
        with open(url, "rb") as f:
            ours += list(iter_tar_samples(f))
    theirs = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert len(theirs) == len(ours) == manifest.num_samples
    for (key, members), sample in zip(ours, theirs, strict=True):
        assert sample["__key__"] == key
        assert {k: v for k, v in sample.items() if not k.startswith("__")} == members
    decoded = decode_sample(theirs[0]["__key__"], theirs[0], PASCAL_TASKS)
    assert decoded["image"].ndim == 3 and decoded["normals"].shape[-1] == 3


def test_npy_reader_round_trips_and_turns_any_header_corruption_into_a_decode_error():
    """Our strict .npy reader (np.load parses headers with ast.literal_eval: tokenizer errors escape the skip
    policy, and forked workers on CPython 3.11 hit "AST constructor recursion depth mismatch")."""
    import io as _io

    import numpy as _np

    from mtlora_dist.data.errors import SampleDecodeError
    from mtlora_dist.data.shards.encoding import read_npy

    for array in (_np.zeros((4, 5, 3), _np.float16), _np.arange(12, dtype=_np.float32).reshape(3, 4)):
        buf = _io.BytesIO()
        _np.save(buf, array, allow_pickle=False)
        data = buf.getvalue()
        assert _np.array_equal(read_npy(data), array) and read_npy(data).dtype == array.dtype
        rng = _np.random.default_rng(0)
        header_end = data.index(b"\n") + 1
        for _ in range(300):
            corrupt = bytearray(data)
            for pos in rng.integers(0, header_end, size=int(rng.integers(1, 4))):
                corrupt[pos] = int(rng.integers(0, 256))
            try:
                out = read_npy(bytes(corrupt))
            except SampleDecodeError:
                continue
            assert out.size * out.itemsize <= len(corrupt)  # a corruption that still parses is a valid array
