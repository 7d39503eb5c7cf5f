"""Checkpointer in one process (a one-rank DeepSpeed ZeRO-2 engine on gloo): layout, atomicity, retention,
safe loading, fingerprints and size. The multi-rank runs are in ``test_checkpoint_resume.py``."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import deepspeed  # noqa: E402
import deepspeed.ops  # noqa: E402

from ckpt_worker import TASKS, TinyMTL, batch, ds_config, full_state  # noqa: E402
from mtlora_dist.engine.checkpoint import (  # noqa: E402
    CheckpointError,
    CheckpointMismatchError,
    Checkpointer,
    ChecksumMismatchError,
    UnsafeCheckpointError,
    frozen_fingerprint,
)
from mtlora_dist.engine.safe_load import SafeTorchCheckpointEngine, sha256_file  # noqa: E402
from mtlora_dist.storage.fs import StorageOptions, url_to_fs  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FINGERPRINT = {"model": "tiny-mtl", "tasks": sorted(TASKS), "lora_rank": 4}


DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module", autouse=True)
def single_rank():
    """A one-rank gloo group in the test process for this module (reused if one exists), then undone."""
    import torch.distributed as dist

    created, saved = not dist.is_initialized(), {k: os.environ.get(k) for k in DIST_VARS}
    if created:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no JIT build of the CPU shm op
        deepspeed.init_distributed(dist_backend="gloo")
    yield
    if created:
        dist.destroy_process_group()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def bench():
    """``benchmarks/checkpoint_size.py`` as a module."""
    spec = importlib.util.spec_from_file_location("checkpoint_size", REPO / "benchmarks" / "checkpoint_size.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_engine(model: nn.Module | None = None, stage: int = 2):
    torch.manual_seed(0)
    model = model or TinyMTL()
    trainable = [p for p in model.parameters() if p.requires_grad]
    warmup = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))  # noqa: E731
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[{"params": trainable}],
                                      config=ds_config(stage), lr_scheduler=warmup)
    return engine


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


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if torch.is_tensor(a[key]):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def client(step: int) -> dict:
    return {"step": step, "rng": torch.get_rng_state(), "data": {"epoch": 0, "next_step": step, "shards": [3, 1]},
            "wandb_id": "abc123", "loss_scale": 1.0}


def tags_in(run_dir: str) -> list[str]:
    fs, path = url_to_fs(f"{run_dir}/checkpoints", StorageOptions())
    return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False) if "step_" in p)


def rewrite_marker(tag_dir: Path, name: str) -> None:
    """What an attacker who can write the bucket would also do: make the marker match the new file."""
    marker_path = tag_dir / "COMPLETE.json"
    marker = json.loads(marker_path.read_text())
    path = tag_dir / name
    marker["files"][name] = {"size": path.stat().st_size, "sha256": sha256_file(str(path))}
    marker_path.write_text(json.dumps(marker))


# ------------------------------------------------------------------------------------------- tests


def test_local_save_load_round_trip_continues_identically(tmp_path):
    run_dir = str(tmp_path / "run")
    engine = make_engine()
    train(engine, 0, 3)
    saved_client = client(3)
    url = Checkpointer(run_dir, fingerprint=FINGERPRINT).save(engine, 3, saved_client)
    assert url == f"{run_dir}/checkpoints/step_00000003"
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_00000003"
    saved_state = full_state(engine)
    expected_losses = train(engine, 3, 5)

    fresh = make_engine()
    ckpt = Checkpointer(run_dir, fingerprint=FINGERPRINT)
    assert ckpt.latest() == "step_00000003"
    state = ckpt.load(fresh)
    assert state["data"] == saved_client["data"] and state["wandb_id"] == "abc123"
    assert torch.equal(state["rng"], saved_client["rng"])
    assert_same_state(full_state(fresh), saved_state)
    torch.set_rng_state(state["rng"])
    assert train(fresh, 3, 5) == expected_losses


def test_frozen_weights_are_not_saved(tmp_path):
    engine = make_engine()
    train(engine, 0, 1)
    url = Checkpointer(str(tmp_path), fingerprint=FINGERPRINT).save(engine, 1, {})
    module = torch.load(Path(url, "mp_rank_00_model_states.pt"), weights_only=False)["module"]
    assert "backbone.weight" not in module and "backbone.bias" not in module
    assert set(module) == {n for n, p in engine.module.named_parameters() if p.requires_grad}


def test_s3_latest_ignores_partial_and_truncated_checkpoints(s3_bucket):
    run_dir = f"s3://{s3_bucket}/runs/r1"
    engine = make_engine()
    ckpt = Checkpointer(run_dir, keep_last=2, fingerprint=FINGERPRINT)
    train(engine, 0, 2)
    ckpt.save(engine, 2, client(2))
    train(engine, 2, 4)
    ckpt.save(engine, 4, client(4))
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
    fs.pipe_file(f"{root}/step_00000008/mp_rank_00_model_states.pt", b"cut")

    assert ckpt.latest() == "step_00000004"
    fresh = make_engine()
    state = Checkpointer(run_dir, keep_last=2, fingerprint=FINGERPRINT).load(fresh)
    assert state["step"] == 4
    assert_same_state(full_state(fresh), full_state(engine))

    # The next save replaces the partial step 6 and retires step 2; step 8 (newer, broken) is left alone.
    train(fresh, 4, 6)
    Checkpointer(run_dir, keep_last=2, fingerprint=FINGERPRINT).save(fresh, 6, client(6))
    assert tags_in(run_dir) == ["step_00000004", "step_00000006", "step_00000008"]
    assert ckpt.latest() == "step_00000006"


def test_retention_keeps_last_complete_and_removes_older_partials(tmp_path):
    run_dir = str(tmp_path / "run")
    engine = make_engine()
    ckpt = Checkpointer(run_dir, keep_last=2, fingerprint=FINGERPRINT)
    for step in (1, 2):
        train(engine, step - 1, step)
        ckpt.save(engine, step, {"step": step})
    (tmp_path / "run" / "checkpoints" / "step_00000002" / "COMPLETE.json").unlink()  # 2 is now partial
    for step in (3, 4):
        train(engine, step - 1, step)
        ckpt.save(engine, step, {"step": step})
    assert tags_in(run_dir) == ["step_00000003", "step_00000004"]
    assert ckpt.save(engine, 4, {"step": 4}).endswith("step_00000004")  # same step again: no rewrite


def test_nothing_to_resume_and_incomplete_tag(tmp_path):
    engine = make_engine()
    ckpt = Checkpointer(str(tmp_path / "empty"), fingerprint=FINGERPRINT)
    assert ckpt.latest() is None
    assert ckpt.load(engine) is None
    ckpt.save(engine, 1, {})
    (tmp_path / "empty" / "checkpoints" / "step_00000001" / "COMPLETE.json").unlink()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        ckpt.load(engine, tag="step_00000001")


class Payload:
    """Unpickling this creates a folder: stands in for any code an attacker would run."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.makedirs, (self.target, 0o777, True))


@pytest.mark.parametrize("victim", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                    "client_state/rank_00000.pt"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, victim):
    run_dir = tmp_path / "run"
    engine = make_engine()
    url = Checkpointer(str(run_dir), fingerprint=FINGERPRINT).save(engine, 1, {"step": 1})
    tag_dir = Path(url)
    sentinel = tmp_path / "pwned"
    torch.save({"module": Payload(str(sentinel)), "optimizer_state_dict": Payload(str(sentinel))}, tag_dir / victim)
    rewrite_marker(tag_dir, victim)

    # The payload is real: loading the way DeepSpeed's default engine does runs it.
    torch.load(tag_dir / victim, weights_only=False)
    assert sentinel.is_dir()
    sentinel.rmdir()

    with pytest.raises(UnsafeCheckpointError, match="makedirs") as refused:
        Checkpointer(str(run_dir), fingerprint=FINGERPRINT).load(make_engine())
    assert "refusing to load" in str(refused.value)
    assert not sentinel.exists()

    # The guard behind the up-front scan: our engine inside DeepSpeed's own load_checkpoint.
    if victim != "client_state/rank_00000.pt":
        fresh = make_engine()
        fresh.checkpoint_engine = SafeTorchCheckpointEngine()
        with pytest.raises(UnsafeCheckpointError, match="weights-only"):
            fresh.load_checkpoint(str(run_dir / "checkpoints"), "step_00000001", load_module_strict=False)
        assert not sentinel.exists()


def test_changed_file_is_refused_by_checksum(tmp_path):
    engine = make_engine()
    train(engine, 0, 1)
    url = Checkpointer(str(tmp_path), fingerprint=FINGERPRINT).save(engine, 1, {})
    shard = Path(url, "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF  # same size: only the checksum can tell
    shard.write_bytes(bytes(data))
    ckpt = Checkpointer(str(tmp_path), fingerprint=FINGERPRINT)
    assert ckpt.latest() == "step_00000001"
    with pytest.raises(ChecksumMismatchError, match="sha256"):
        ckpt.load(make_engine())


class OtherModel(TinyMTL):
    """Another task set and a larger adapter rank: nothing of it should load silently."""

    def __init__(self) -> None:
        super().__init__(rank=8)
        self.heads = nn.ModuleDict({"semseg": nn.Linear(256, 8), "normals": nn.Linear(256, 3)})


def test_fingerprint_mismatch_lists_keys_and_the_fix(tmp_path):
    engine = make_engine()
    Checkpointer(str(tmp_path), fingerprint=FINGERPRINT).save(engine, 1, {})
    other_config = {"model": "tiny-mtl", "tasks": ["normals", "semseg"], "lora_rank": 8}
    with pytest.raises(CheckpointMismatchError) as err:
        Checkpointer(str(tmp_path), fingerprint=other_config).load(make_engine(OtherModel()))
    message = str(err.value)
    assert "missing keys" in message and "heads.normals.weight" in message
    assert "unexpected keys" in message and "heads.depth.weight" in message
    assert "lora_a: checkpoint [256, 4] vs model [256, 8]" in message
    assert "lora_rank: checkpoint 4 vs this run 8" in message
    assert "run_dir" in message and "new folder" in message
    # The config part alone is checked too.
    with pytest.raises(CheckpointMismatchError, match="model: checkpoint 'tiny-mtl' vs this run 'tiny-v2'"):
        Checkpointer(str(tmp_path), fingerprint={**FINGERPRINT, "model": "tiny-v2"}).load(make_engine())


def test_client_state_must_be_plain_data(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    engine = make_engine()
    with pytest.raises(TypeError, match="plain data"):
        Checkpointer(str(tmp_path), fingerprint=FINGERPRINT).save(engine, 1, {"scaler": LossScaler(1.0)})
    assert not (tmp_path / "checkpoints" / "step_00000001").exists()


def test_zero3_resumes_exactly_on_the_same_number_of_ranks(tmp_path):
    engine = make_engine(stage=3)
    train(engine, 0, 3)
    ckpt = Checkpointer(str(tmp_path), fingerprint=FINGERPRINT)
    ckpt.save(engine, 3, {"step": 3, "rng": torch.get_rng_state()})
    straight = train(engine, 3, 6)
    resumed_engine = make_engine(stage=3)
    client = Checkpointer(str(tmp_path), fingerprint=FINGERPRINT).load(resumed_engine)
    assert client["step"] == 3
    torch.set_rng_state(client["rng"])  # the model has dropout
    assert train(resumed_engine, 3, 6) == straight


def test_zero3_checkpoint_from_another_world_size_is_refused_clearly(tmp_path):
    engine = make_engine(stage=3)
    train(engine, 0, 1)
    Checkpointer(str(tmp_path), fingerprint=FINGERPRINT).save(engine, 1, {})
    marker_path = tmp_path / "checkpoints" / "step_00000001" / "COMPLETE.json"
    marker = json.loads(marker_path.read_text())
    marker["world_size"] = 2  # as if written by two ranks
    marker_path.write_text(json.dumps(marker))
    with pytest.raises(CheckpointError, match="same number of ranks"):
        Checkpointer(str(tmp_path), fingerprint=FINGERPRINT).load(make_engine(stage=3))


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
    key = "runs/mpu/checkpoints/step_00000002/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    fs.call_s3("create_multipart_upload", Bucket=s3_bucket, Key=key)
    try:
        listed = fs.call_s3("list_multipart_uploads", Bucket=s3_bucket, Prefix="runs/mpu/").get("Uploads", [])
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"this S3 server cannot list multipart uploads: {err}")
    if not listed:
        pytest.skip("this S3 server does not report unfinished multipart uploads")
    assert Checkpointer(run_dir, fingerprint=FINGERPRINT).load(make_engine()) is None
    assert not fs.call_s3("list_multipart_uploads", Bucket=s3_bucket, Prefix="runs/mpu/").get("Uploads", [])


def test_checkpoint_size_is_the_trainable_state(bench, tmp_path):
    torch.manual_seed(0)
    model = bench.synthetic_model(frozen=2_000_000, trainable=120_000, dim=512)
    result = bench.measure(model, str(tmp_path))
    assert abs(result["ours_vs_expected"] - 1.0) < 0.10, result
    assert result["default_bytes"] > 3 * result["ours_bytes"], result
