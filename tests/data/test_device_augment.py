"""Augmentation on the training device (``augment_device="device"``): workers decode only, the loader
warps whole batches with ``transforms.warp_batch``. On a machine without a GPU the same code runs on
the CPU in the main process; with one, the tests also run it on CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mtlora_dist.data.stream.loader as loader_mod
import mtlora_dist.data.stream.streaming as streaming_mod
from mtlora_dist.data.stream.batch import collate_decoded
from mtlora_dist.data.stream.transforms import AUGMENT, Resampling, Warp, sample_warp, warp_batch, warp_sample

from datatest_utils import PASCAL, assert_batches_equal, keys_of, pascal_loader, state_after

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _host(batch: dict) -> dict:
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@pytest.mark.parametrize("device", DEVICES)
def test_device_batches_match_the_worker_batches(pascal_shards, device):
    """Same samples in the same order, same format, and the same warp: outputs agree pixel for pixel
    up to interpolation rounding (a different warp would move every boundary)."""
    url = pascal_shards["train"]
    on_workers = list(pascal_loader(url, num_workers=2, batch_size=3, seed=6))
    loader = pascal_loader(url, num_workers=2, batch_size=3, seed=6, augment_device="device", device=device)
    on_device = list(loader)
    assert keys_of(on_device) == keys_of(on_workers)
    for a, b in zip(on_workers, on_device, strict=True):
        assert b["image"].device.type == device and b["valid"].device.type == device
        b = _host(b)
        assert a.keys() == b.keys()
        for key, value in a.items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == b[key].dtype and value.shape == b[key].shape, key
        assert torch.equal(a["label_size"], b["label_size"]) and torch.equal(a["valid"], b["valid"])
        assert (a["image"].float() - b["image"].float()).abs().mean() < 0.5
        for task in ("semseg", "human_parts", "sal"):
            assert (a[task] == b[task]).float().mean() > 0.995, task
        valid = (a["normals"] != 255).all(1) & (b["normals"] != 255).all(1)
        assert ((a["normals"] == 255).all(1) == (b["normals"] == 255).all(1)).float().mean() > 0.995
        cos = (a["normals"].float() * b["normals"].float()).sum(1)[valid]
        assert cos.mean() > 0.999


def test_device_path_draws_the_cpu_paths_warps(pascal_shards, monkeypatch):
    """Every sample gets the warp the worker path gives it: both draw from (seed, epoch, shard, index)."""
    worker_warps, device_warps = {}, {}

    def recording_warp_sample(sample, tasks, out_hw, warp, resampling):
        worker_warps[sample["__key__"]] = warp
        return warp_sample(sample, tasks, out_hw, warp, resampling)

    def recording_warp_batch(raw, tasks, out_hw, resampling):
        for key, row in zip(raw["__key__"], raw["warp"].tolist(), strict=True):
            device_warps[key] = Warp(bool(row[0]), row[1], row[2])
        return warp_batch(raw, tasks, out_hw, resampling)

    monkeypatch.setattr(streaming_mod, "warp_sample", recording_warp_sample)
    monkeypatch.setattr(loader_mod, "warp_batch", recording_warp_batch)
    url = pascal_shards["train"]
    for epoch in (0, 1):
        worker_warps.clear()
        device_warps.clear()
        for kw in ({}, {"augment_device": "device", "device": "cpu"}):
            loader = pascal_loader(url, num_workers=0, batch_size=2, seed=9, **kw)
            loader.set_epoch(epoch)
            list(loader)
        assert len(device_warps) == len(worker_warps) == PASCAL["num_train"]
        assert device_warps == worker_warps
        spec = AUGMENT["pascal_context"]
        assert all(abs(w.angle_deg) <= spec.max_rotation_deg and 0.75 <= w.scale <= 1.25 for w in device_warps.values())
    # the distribution itself: the same draws as the recipe's sampler
    rng = np.random.default_rng(0)
    draws = [sample_warp(AUGMENT["pascal_context"], rng) for _ in range(400)]
    assert 0.4 < np.mean([w.flip for w in draws]) < 0.6


@pytest.mark.parametrize("device", DEVICES)
def test_device_path_resumes_exactly(pascal_shards, device):
    url, kw = (
        pascal_shards["train"],
        {"num_workers": 2, "batch_size": 2, "seed": 4, "augment_device": "device", "device": device},
    )
    reference = pascal_loader(url, **kw)
    reference.set_epoch(1)
    expected = [_host(b) for b in reference]
    interrupted = pascal_loader(url, **kw)
    interrupted.set_epoch(1)
    state = state_after(interrupted, 5)
    resumed = pascal_loader(url, **kw)
    resumed.load_state_dict(state)
    assert_batches_equal([_host(b) for b in resumed], expected[5:])


# ---------------------------------------------------------------------------- alignment, batched

PALETTE = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200], [220, 220, 40], [40, 220, 220]], np.uint8)


def _sample(h: int, w: int, seed: int) -> dict:
    """Class blocks whose colour in the image is the class's palette colour; normals of a dome."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    classes = ((xx // 17 + yy // 13 + rng.integers(0, 5)) % len(PALETTE)).astype(np.uint8)
    height = 8.0 * np.exp(-((xx - w * 0.4) ** 2 + (yy - h * 0.6) ** 2) / (2 * (0.3 * min(h, w)) ** 2))
    gy, gx = np.gradient(height)
    normals = np.stack([-gx, -gy, np.ones_like(gx)], -1)
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    return {
        "__key__": f"s{seed}",
        "image": PALETTE[classes],
        "semseg": classes,
        "normals": normals.astype(np.float16),
        "label_hw": (h, w),
    }


@pytest.mark.parametrize("device", DEVICES)
def test_batched_warp_keeps_labels_aligned_and_equals_the_per_sample_warp(device):
    """Samples of different sizes padded into one batch: each comes out as if warped alone, class maps
    with nearest (no new values, the image colour under each labelled pixel is its class colour) and
    normals rotated with the image."""
    samples = [_sample(50, 70, 1), _sample(64, 48, 2), _sample(41, 59, 3)]
    warps = [Warp(True, 17.0, 1.2), Warp(False, -12.0, 0.8), Warp(True, 0.0, 1.0)]
    out_hw = (40, 52)
    resampling = Resampling("torch", "bilinear")
    for sample, warp in zip(samples, warps, strict=True):
        sample.update(warp=warp, valid=True)
    raw = collate_decoded(samples, ["semseg", "normals"])
    batch = _host(
        warp_batch(
            {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in raw.items()},
            ["semseg", "normals"],
            out_hw,
            resampling,
        )
    )
    for i, (sample, warp) in enumerate(zip(samples, warps, strict=True)):
        alone = warp_sample(sample, ["semseg", "normals"], out_hw, warp, resampling)
        np.testing.assert_array_equal(batch["semseg"][i].numpy(), alone["semseg"])
        assert np.abs(batch["image"][i].numpy().astype(int) - alone["image"]).max() <= 1
        assert np.abs(batch["normals"][i].float().numpy() - alone["normals"].astype(np.float32)).max() < 2e-3
        cv = warp_sample(sample, ["semseg", "normals"], out_hw, warp, Resampling("opencv", "bilinear"))
        assert (cv["semseg"] == alone["semseg"]).mean() > 0.99  # the CPU path: same warp, same labels
        labels = batch["semseg"][i].numpy()
        assert set(np.unique(labels)) <= set(np.unique(sample["semseg"])) | {255}
        image = batch["image"][i].numpy().transpose(1, 2, 0).astype(int)
        # pixels whose 3x3 neighbourhood has one class: the image shows that class's colour there
        padded = np.pad(labels, 1, constant_values=254)
        uniform = np.ones_like(labels, bool)
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                uniform &= padded[dy : dy + labels.shape[0], dx : dx + labels.shape[1]] == labels
        uniform &= labels != 255
        assert uniform.sum() > 0.3 * labels.size
        diff = np.abs(image[uniform] - PALETTE[labels[uniform]].astype(int))
        assert diff.max() <= 25 and (diff == 0).mean() > 0.9  # bicubic ringing near edges; misaligned: ~170
    # normals turn with the content: a flip negates x on the mirrored surface
    plain = collate_decoded([{**samples[2], "warp": Warp()}], ["normals"])
    flipped = warp_batch(raw, ["normals"], out_hw, resampling)["normals"][2].float()
    straight = warp_batch(plain, ["normals"], out_hw, resampling)["normals"][0].float()
    valid = (flipped != 255).all(0) & (straight.flip(-1) != 255).all(0)
    assert torch.allclose(flipped[0][valid], -straight.flip(-1)[0][valid], atol=2e-3)
    assert torch.allclose(flipped[1][valid], straight.flip(-1)[1][valid], atol=2e-3)
