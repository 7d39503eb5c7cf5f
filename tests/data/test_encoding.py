"""Sample encoding in tar members: round trip, determinism, and safe failure on corrupt data."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from mtlora_dist.data.encoding import check_png, decode_sample, encode_sample, member_suffix
from mtlora_dist.data.errors import SampleDecodeError
from mtlora_dist.data.formats import get_reader
from mtlora_dist.data.tarshards import TarShardWriter, iter_tar_samples, split_member_name

from datatest_utils import NYUD_TASKS, PASCAL_TASKS


def _round_trip(reader, tasks):
    sample_id = reader.ids("train")[1]
    sample = reader.read(sample_id)
    members = encode_sample(sample, tasks)
    assert [m for m, _ in members] == ["jpg"] + [member_suffix(t) for t in tasks]
    assert members == encode_sample(sample, tasks)  # deterministic bytes
    decoded = decode_sample(sample_id, dict(members), tasks)
    return sample, decoded


def test_pascal_round_trip(pascal_root):
    sample, decoded = _round_trip(get_reader("pascal_context", pascal_root), PASCAL_TASKS)
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


def test_corrupt_png_is_an_exception_not_a_crash(pascal_root):
    sample_id, members = _png_members(pascal_root)
    png = members["semseg.png"]
    check_png(png)
    idat = png.index(b"IDAT") + 10
    flipped = png[:idat] + bytes([png[idat] ^ 0xFF]) + png[idat + 1:]
    for bad, why in ((flipped, "bad CRC"), (png[: len(png) // 2], "truncated"), (b"garbage" * 10, "signature")):
        with pytest.raises(SampleDecodeError, match=why):
            check_png(bad)
        with pytest.raises(SampleDecodeError, match=f"sample '{sample_id}' member 'semseg.png'"):
            decode_sample(sample_id, {**members, "semseg.png": bad}, ["semseg"])


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
    with pytest.raises(SampleDecodeError, match="but the image is"):
        decode_sample(sample_id, {**members, "normals.npy": small.getvalue()}, ["normals"])


def test_missing_member_names_what_is_missing(pascal_root):
    sample_id, members = _png_members(pascal_root)
    with pytest.raises(SampleDecodeError, match=r"lacks member\(s\) \['sal.png'\]"):
        decode_sample(sample_id, members, ["semseg", "sal"])


def test_tar_writer_is_deterministic_and_readable(tmp_path):
    samples = [("a_1", [("jpg", b"x" * 700), ("semseg.png", b"y")]), ("b_2", [("jpg", b"z" * 3)])]
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
        assert [(k, sorted(m)) for k, m in iter_tar_samples(f)] == [("a_1", ["jpg", "semseg.png"]), ("b_2", ["jpg"])]
    assert split_member_name("d/2008_000002.semseg.png") == ("d/2008_000002", "semseg.png")


def test_npy_reader_round_trips_and_turns_any_header_corruption_into_a_decode_error():
    """Our strict .npy reader (np.load parses headers with ast.literal_eval: tokenizer errors escape the skip
    policy, and forked workers on CPython 3.11 hit "AST constructor recursion depth mismatch")."""
    import io as _io

    import numpy as _np

    from mtlora_dist.data.encoding import read_npy
    from mtlora_dist.data.errors import SampleDecodeError

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
