"""Checkpoints that are not what the run wrote (issue 26, items 2 and 7): retention never deletes through a
link out of ``checkpoints/``, and files replaced together with a matching COMPLETE.json (wrong shapes,
dtypes, a forged fingerprint, a garbage state.json) are refused with a CheckpointError before anything is
copied into the model."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mtlora_dist.checkpoint import Checkpointer, CheckpointError, SavePolicy  # noqa: E402
from mtlora_dist.checkpoint.format import sha256_bytes, tensors_from_bytes, tensors_to_bytes  # noqa: E402

from ckpt_worker import FINGERPRINT, make_engine  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def single_rank(single_rank_group):
    """Every test here runs in a one-rank gloo group (tests/conftest.py)."""


def _checkpointer(run_dir: Path, engine, keep_last: int = 3) -> Checkpointer:
    return Checkpointer(str(run_dir), engine, policy=SavePolicy(0, keep_last), fingerprint=FINGERPRINT)


def _replace(tag_dir: Path, name: str, data: bytes) -> None:
    """Replace one file and update COMPLETE.json to match, as someone who can write the run folder could."""
    (tag_dir / name).write_bytes(data)
    marker = json.loads((tag_dir / "COMPLETE.json").read_text())
    marker["files"][name] = {"size": len(data), "sha256": sha256_bytes(data)}
    (tag_dir / "COMPLETE.json").write_text(json.dumps(marker))


def test_retention_never_follows_a_link_out_of_checkpoints(tmp_path, caplog):
    engine = make_engine()
    outside = Path(_checkpointer(tmp_path / "other", engine).save(1))  # a complete checkpoint elsewhere
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    os.symlink(os.path.relpath(outside, run_dir / "checkpoints"), run_dir / "checkpoints" / "step_00000001")
    ckpt = _checkpointer(run_dir, engine, keep_last=2)
    with caplog.at_level(logging.INFO, logger="mtlora_dist"):
        assert ckpt.resume() == 1
    assert "saved by 1 rank)" in caplog.text  # not "1 ranks"
    for step in (2, 3, 4):
        ckpt.save(step)
    assert (outside / "COMPLETE.json").is_file() and (outside / "trainable.safetensors").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000003", "step_00000004"]


def _tensors(tag_dir: Path, name: str) -> dict:
    return tensors_from_bytes((tag_dir / name).read_bytes())


def _wrong_shape(tag_dir: Path) -> None:
    tensors = _tensors(tag_dir, "trainable.safetensors")
    key = next(iter(tensors))
    tensors[key] = torch.zeros(tensors[key].numel() + 3)
    _replace(tag_dir, "trainable.safetensors", tensors_to_bytes(tensors))


def _wrong_dtype(tag_dir: Path) -> None:
    tensors = {k: v.to(torch.int64) for k, v in _tensors(tag_dir, "trainable.safetensors").items()}
    _replace(tag_dir, "trainable.safetensors", tensors_to_bytes(tensors))


def _moment_of_another_model(tag_dir: Path) -> None:
    """What a fingerprint made to match this model hides: an Adam moment of another model's shape."""
    tensors = _tensors(tag_dir, "trainable.safetensors")
    key = next(k for k in tensors if k.startswith("exp_avg/"))
    tensors[key] = torch.zeros(*[d + 1 for d in tensors[key].shape])
    _replace(tag_dir, "trainable.safetensors", tensors_to_bytes(tensors))


def _garbage_state(tag_dir: Path) -> None:
    _replace(tag_dir, "state.json", json.dumps({"step": [1], "engine": [], "per_rank": "x"}).encode())


def _not_json_state(tag_dir: Path) -> None:
    _replace(tag_dir, "state.json", b"\x00\x01 not json")


@pytest.mark.parametrize(
    "tamper", [_wrong_shape, _wrong_dtype, _moment_of_another_model, _garbage_state, _not_json_state]
)
def test_tampered_files_are_a_checkpoint_error_and_copy_nothing(tmp_path, tamper):
    engine = make_engine()
    tag_dir = Path(_checkpointer(tmp_path / "run", engine).save(1))
    tamper(tag_dir)
    fresh = make_engine()
    before = {n: p.detach().clone() for n, p in fresh.module.named_parameters()}
    with pytest.raises(CheckpointError, match=r"step_00000001|do not fit this model"):
        _checkpointer(tmp_path / "run", fresh).resume()
    assert all(torch.equal(before[n], p) for n, p in fresh.module.named_parameters())
    assert fresh.global_steps == 0
