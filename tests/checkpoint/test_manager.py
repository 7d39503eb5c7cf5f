"""The Checkpointer in one process (a one-rank DeepSpeed engine on gloo): round trip, layout, what
counts as complete, retention, integrity, fingerprints, unsafe content. Multi-rank runs: test_resume.py."""

from __future__ import annotations

import ast
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))


from mtlora_dist.checkpoint import (  # noqa: E402
    Checkpointer,
    CheckpointError,
    CheckpointMismatchError,
    ChecksumMismatchError,
    SavePolicy,
    frozen_fingerprint,
)
from mtlora_dist.checkpoint.format import sha256_bytes, tensors_from_bytes  # noqa: E402
from mtlora_dist.storage.fs import StorageOptions, url_to_fs  # noqa: E402

from ckpt_worker import FINGERPRINT, TASKS, Pieces, TinyMTL, batch, full_state, make_engine  # noqa: E402

PACKAGE = Path(__file__).resolve().parents[2] / "mtlora_dist"


@pytest.fixture(scope="module", autouse=True)
def single_rank(single_rank_group):
    """Every test here runs in a one-rank gloo group (tests/conftest.py)."""


def train(engine, start: int, stop: int) -> list[float]:
    losses = []
    for step in range(start, stop):
        x, targets = batch(step, 0)
        out = engine(x)
        loss = sum(F.mse_loss(out[t], targets[t]) for t in TASKS)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def checkpointer(run_dir, engine, keep_last: int = 3, fingerprint=FINGERPRINT) -> tuple[Checkpointer, Pieces]:
    ckpt = Checkpointer(str(run_dir), engine, policy=SavePolicy(0, keep_last), fingerprint=fingerprint)
    pieces = Pieces()
    ckpt.register("toy", pieces, per_rank=True)
    return ckpt, pieces


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if torch.is_tensor(a[key]):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def tags_in(run_dir: str) -> list[str]:
    fs, path = url_to_fs(f"{run_dir}/checkpoints", StorageOptions())
    fs.invalidate_cache()
    return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False) if "step_" in p)


def rewrite_marker(tag_dir: Path, name: str) -> None:
    """What an attacker who can write the bucket would also do: make the marker match the new file."""
    marker_path = tag_dir / "COMPLETE.json"
    marker = json.loads(marker_path.read_text())
    data = (tag_dir / name).read_bytes()
    marker["files"][name] = {"size": len(data), "sha256": sha256_bytes(data)}
    marker_path.write_text(json.dumps(marker))


def test_round_trip_continues_identically(tmp_path):
    engine = make_engine()
    ckpt, pieces = checkpointer(tmp_path / "run", engine)
    train(engine, 0, 3)
    pieces.next_step = 3
    assert ckpt.save(3) == f"{tmp_path / 'run'}/checkpoints/step_00000003"
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    saved, expected = full_state(engine), train(engine, 3, 5)

    fresh = make_engine()
    ckpt2, pieces2 = checkpointer(tmp_path / "run", fresh)
    assert ckpt2.latest() == "step_00000003" and ckpt2.resume() == 3
    assert pieces2.next_step == 3
    assert_same_state(full_state(fresh), saved)
    assert train(fresh, 3, 5) == expected  # the RNG (dropout) came back too


def test_only_the_trainable_state_is_saved(tmp_path):
    engine = make_engine()
    ckpt, _ = checkpointer(tmp_path, engine)
    train(engine, 0, 1)
    tensors = tensors_from_bytes(Path(ckpt.save(1), "trainable.safetensors").read_bytes())
    trainable = {n for n, p in engine.module.named_parameters() if p.requires_grad}
    assert {k.split("/", 1)[1] for k in tensors if k.startswith("param/")} == trainable
    assert {k.split("/", 1)[0] for k in tensors} == {"param", "exp_avg", "exp_avg_sq"}
    assert not any("backbone" in k for k in tensors)


def test_s3_newest_ignores_partial_and_truncated_checkpoints(s3_bucket):
    run_dir = f"s3://{s3_bucket}/runs/r1"
    engine = make_engine()
    ckpt, _ = checkpointer(run_dir, engine, keep_last=2)
    train(engine, 0, 2)
    ckpt.save(2)
    train(engine, 2, 4)
    ckpt.save(4)
    ckpt.wait()
    assert ckpt.latest() == "step_00000004"

    fs, root = url_to_fs(f"{run_dir}/checkpoints", StorageOptions())
    # A save killed after its uploads: every file there, no marker; `latest` even points at it.
    for name in fs.find(f"{root}/step_00000004"):
        if not name.endswith("COMPLETE.json"):
            fs.copy(name, name.replace("step_00000004", "step_00000006"))
    fs.pipe_file(f"{root}/latest", b"step_00000006")
    # A marker whose files did not all arrive intact (one object cut short).
    for name in fs.find(f"{root}/step_00000004"):
        fs.copy(name, name.replace("step_00000004", "step_00000008"))
    marker = json.loads(fs.cat_file(f"{root}/step_00000008/COMPLETE.json"))
    marker["tag"] = "step_00000008"
    fs.pipe_file(f"{root}/step_00000008/COMPLETE.json", json.dumps(marker).encode())
    fs.pipe_file(f"{root}/step_00000008/trainable.safetensors", b"cut")

    assert ckpt.latest() == "step_00000004"
    fresh = make_engine()
    ckpt2, _ = checkpointer(run_dir, fresh, keep_last=2)
    assert ckpt2.resume() == 4
    assert_same_state(full_state(fresh), full_state(engine))
    # The next save replaces the partial step 6 and retires step 2; step 8 (newer, broken) is left alone.
    train(fresh, 4, 6)
    ckpt2.save(6)
    ckpt2.wait()
    assert tags_in(run_dir) == ["step_00000004", "step_00000006", "step_00000008"]
    assert ckpt.latest() == "step_00000006"


def test_retention_and_the_save_policy(tmp_path):
    engine = make_engine()
    ckpt = Checkpointer(str(tmp_path / "run"), engine, policy=SavePolicy(every=2, keep_last=2), fingerprint=FINGERPRINT)
    assert [s for s in range(1, 7) if ckpt.should_save(s, final=False, stopping=False)] == [2, 4, 6]
    assert ckpt.should_save(3, final=True, stopping=False) and ckpt.should_save(5, final=False, stopping=True)
    for step in (1, 2):
        train(engine, step - 1, step)
        ckpt.save(step)
    (tmp_path / "run" / "checkpoints" / "step_00000002" / "COMPLETE.json").unlink()  # 2 is now partial
    for step in (3, 4):
        train(engine, step - 1, step)
        ckpt.save(step)
    assert tags_in(str(tmp_path / "run")) == ["step_00000003", "step_00000004"]
    assert not ckpt.should_save(4, final=True, stopping=True)  # just saved: no second copy of the same step


def test_an_unreachable_run_dir_is_one_message_on_every_rank():
    """Rank 0 looks for checkpoints; a dead endpoint must reach every rank as one error naming where and what to
    check (not a botocore traceback on rank 0 and a wait forever on the others)."""
    from mtlora_dist.storage.retry import StorageUnavailableError

    from s3_server import free_port

    storage = StorageOptions(endpoint_url=f"http://127.0.0.1:{free_port()}", key="k", secret="s", retries=0)
    ckpt = Checkpointer("s3://nowhere/run", make_engine(), fingerprint=FINGERPRINT, storage=storage)
    with pytest.raises(StorageUnavailableError, match=r"s3://nowhere/run/checkpoints at endpoint http://127\.0\.0\.1"):
        ckpt.resume()


def test_nothing_to_resume(tmp_path):
    ckpt, _ = checkpointer(tmp_path / "empty", make_engine())
    assert ckpt.latest() is None and ckpt.resume() is None


class Payload:
    """Unpickling this creates a folder: stands in for any code an attacker would run."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.makedirs, (self.target, 0o777, True))


def test_a_malicious_pickle_in_a_checkpoint_never_runs(tmp_path):
    engine = make_engine()
    ckpt, _ = checkpointer(tmp_path / "run", engine)
    tag_dir = Path(ckpt.save(1))
    sentinel = tmp_path / "pwned"
    torch.save({"module": Payload(str(sentinel))}, tag_dir / "trainable.safetensors")
    rewrite_marker(tag_dir, "trainable.safetensors")
    torch.save(Payload(str(sentinel)), tag_dir / "mp_rank_00_model_states.pt")  # beside it, as DeepSpeed names it
    (tag_dir / "zero_to_fp32.py").write_text(f"import os; os.makedirs({str(sentinel)!r})\n")

    torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)  # the payload is real
    assert sentinel.is_dir()
    sentinel.rmdir()
    ckpt2, _ = checkpointer(tmp_path / "run", make_engine())
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        ckpt2.resume()
    assert not sentinel.exists()


def _unpickling_calls(tree: ast.AST) -> list[int]:
    """Lines of ``pickle.load(s)`` calls and of ``torch.load`` calls without ``weights_only=True``."""
    lines = []
    for node in ast.walk(tree):
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
        ):
            continue
        owner, name = node.func.value.id, node.func.attr
        weights_only = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in node.keywords)
        if (owner == "pickle" and name in ("load", "loads")) or (
            owner == "torch" and name == "load" and not weights_only
        ):
            lines.append(node.lineno)
    return lines


def test_the_package_never_unpickles():
    """Checkpoints are safetensors and JSON; the one torch.load (official Swin weights) is weights-only."""
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{line}"
        for path in PACKAGE.rglob("*.py")
        for line in _unpickling_calls(ast.parse(path.read_text()))
    ]
    assert not found, found
    probe = "import pickle, torch\npickle.loads(b)\ntorch.load(f)\ntorch.load(f, weights_only=True)\n"
    assert _unpickling_calls(ast.parse(probe)) == [2, 3]  # the check itself sees both


def test_a_changed_file_is_refused_by_checksum(tmp_path):
    engine = make_engine()
    ckpt, _ = checkpointer(tmp_path, engine)
    train(engine, 0, 1)
    path = Path(ckpt.save(1), "trainable.safetensors")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # same size: only the checksum can tell
    path.write_bytes(bytes(data))
    ckpt2, _ = checkpointer(tmp_path, make_engine())
    assert ckpt2.latest() == "step_00000001"
    with pytest.raises(ChecksumMismatchError, match="sha256"):
        ckpt2.resume()


class OtherModel(TinyMTL):
    """Another task set and a larger adapter rank: nothing of it should load silently."""

    def __init__(self) -> None:
        super().__init__(rank=8)
        self.heads = nn.ModuleDict({"semseg": nn.Linear(256, 8), "normals": nn.Linear(256, 3)})


def test_fingerprint_mismatch_lists_keys_and_the_fix(tmp_path):
    checkpointer(tmp_path, make_engine())[0].save(1)
    other_config = {"model": "tiny-mtl", "tasks": ["normals", "semseg"], "lora_rank": 8}
    with pytest.raises(CheckpointMismatchError) as err:
        checkpointer(tmp_path, make_engine(model=OtherModel()), fingerprint=other_config)[0].resume()
    message = str(err.value)
    assert "missing keys" in message and "heads.normals.weight" in message
    assert "unexpected keys" in message and "heads.depth.weight" in message
    assert "lora_a: checkpoint [256, 4] vs model [256, 8]" in message
    assert "lora_rank: checkpoint 4 vs this run 8" in message
    assert "new run_dir" in message
    with pytest.raises(CheckpointMismatchError, match="model: checkpoint 'tiny-mtl' vs this run 'tiny-v2'"):
        checkpointer(tmp_path, make_engine(), fingerprint={**FINGERPRINT, "model": "tiny-v2"})[0].resume()


def test_a_changed_frozen_backbone_is_refused(tmp_path):
    checkpointer(tmp_path, make_engine())[0].save(1)
    engine = make_engine()
    with torch.no_grad():
        engine.module.backbone.weight[0, 0] += 1.0
    with pytest.raises(CheckpointMismatchError, match="frozen backbone differs"):
        checkpointer(tmp_path, engine)[0].resume()


class Opaque:
    def state_dict(self):
        return {"scaler": object()}

    def load_state_dict(self, state, same_world):
        pass


def test_piece_state_must_be_plain_data_and_tensors(tmp_path):
    ckpt, _ = checkpointer(tmp_path, make_engine())
    ckpt.register("opaque", Opaque(), per_rank=False)
    with pytest.raises(CheckpointError, match="JSON and tensors only"):
        ckpt.save(1)
    assert not (tmp_path / "checkpoints" / "step_00000001" / "COMPLETE.json").exists()


def test_a_checkpoint_of_the_old_format_is_named_not_ignored(tmp_path):
    tag_dir = tmp_path / "checkpoints" / "step_00000005"
    tag_dir.mkdir(parents=True)
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"x")
    (tag_dir / "COMPLETE.json").write_text(
        json.dumps(
            {
                "format": "mtlora-dist-checkpoint/1",
                "tag": "step_00000005",
                "files": {"mp_rank_00_model_states.pt": {"size": 1}},
            }
        )
    )
    with pytest.raises(CheckpointError, match="format 'mtlora-dist-checkpoint/1'"):
        checkpointer(tmp_path, make_engine())[0].resume()


def test_frozen_fingerprint_tracks_frozen_weights_only():
    torch.manual_seed(0)
    model = TinyMTL()
    before = frozen_fingerprint(model)
    with torch.no_grad():
        model.lora_a.add_(1.0)
        model.heads["depth"].bias.add_(1.0)
    assert frozen_fingerprint(model) == before
    with torch.no_grad():
        model.backbone.weight[0, 0] += 1e-6
    assert frozen_fingerprint(model) != before


def test_stale_multipart_uploads_are_aborted(s3_bucket):
    run_dir = f"s3://{s3_bucket}/runs/mpu"
    fs, _ = url_to_fs(run_dir, StorageOptions())
    key = "runs/mpu/checkpoints/step_00000002/trainable.safetensors"
    fs.call_s3("create_multipart_upload", Bucket=s3_bucket, Key=key)
    try:
        listed = fs.call_s3("list_multipart_uploads", Bucket=s3_bucket, Prefix="runs/mpu/").get("Uploads", [])
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"this S3 server cannot list multipart uploads: {err}")
    if not listed:
        pytest.skip("this S3 server does not report unfinished multipart uploads")
    assert checkpointer(run_dir, make_engine())[0].resume() is None
    assert not fs.call_s3("list_multipart_uploads", Bucket=s3_bucket, Prefix="runs/mpu/").get("Uploads", [])


def test_checkpoint_size_is_the_trainable_state(tmp_path):
    """``benchmarks/checkpoint_size.py``: ours is trainable x 12 bytes, far below DeepSpeed's default."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "checkpoint_size", PACKAGE.parent / "benchmarks" / "checkpoint_size.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    torch.manual_seed(0)
    result = bench.measure(bench.synthetic_model(frozen=2_000_000, trainable=120_000, dim=512), str(tmp_path))
    assert abs(result["ours_vs_expected"] - 1.0) < 0.10, result
    assert result["default_bytes"] > 3 * result["ours_bytes"], result
