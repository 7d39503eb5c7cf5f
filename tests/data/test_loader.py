"""The loader on local shards: batch format, coverage per epoch, determinism, resume, evaluation."""

from __future__ import annotations

import io

import pytest
import torch

from mtlora_dist.data import normalize_image
from mtlora_dist.data.ingest.convert import convert
from mtlora_dist.data.shards.manifest import read_manifest

from datatest_utils import (
    NYUD,
    NYUD_TASKS,
    PASCAL,
    assert_batches_equal,
    keys_of,
    multiplicity,
    pascal_loader,
    valid_keys,
)
from factories import make_loader


def test_training_batch_format(pascal_shards):
    loader = pascal_loader(pascal_shards["train"], img_size=(40, 56), batch_size=3)
    batch = next(iter(loader))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (3, 3, 40, 56)
    for task in ("semseg", "human_parts", "sal", "edge"):
        assert batch[task].dtype == torch.uint8 and batch[task].shape == (3, 40, 56)
    assert set(torch.unique(batch["sal"]).tolist()) <= {0, 1, 255}
    assert set(torch.unique(batch["semseg"]).tolist()) <= set(range(21)) | {255}
    n = batch["normals"]
    assert n.dtype == torch.float16 and n.shape == (3, 3, 40, 56)
    ignored = (n == 255).all(1)
    assert ((n == 255).any(1) == ignored).all()
    norms = n.float().norm(dim=1)[~ignored]
    assert (norms - 1).abs().max() < 3e-3
    assert batch["label_size"].dtype == torch.int64 and batch["label_size"].tolist() == [[40, 56]] * 3
    assert batch["valid"].dtype == torch.bool and batch["valid"].all()
    assert len(batch["__key__"]) == 3 and all(isinstance(k, str) for k in batch["__key__"])
    image = normalize_image(batch["image"])
    assert image.dtype == torch.float32 and image.shape == batch["image"].shape
    expected = (batch["image"][0, 0, 0, 0].float() / 255 - 0.485) / 0.229
    assert image[0, 0, 0, 0] == pytest.approx(float(expected), abs=1e-6)


def test_two_ranks_two_workers_see_each_sample_once_per_epoch(pascal_shards):
    loaders = [
        pascal_loader(pascal_shards["train"], num_workers=2, rank=r, world_size=2, batch_size=3, seed=5)
        for r in range(2)
    ]
    assert len(loaders[0]) == len(loaders[1]) == PASCAL["num_train"] // 6
    epochs = []
    for epoch in (0, 1):
        keys = []
        for loader in loaders:
            loader.set_epoch(epoch)
            batches = list(loader)
            assert len(batches) == len(loader)
            keys += keys_of(batches)
        assert multiplicity(keys).most_common(1)[0][1] == 1 and len(keys) == PASCAL["num_train"]
        epochs.append(keys)
    assert epochs[0] != epochs[1]
    again = keys_of(
        list(pascal_loader(pascal_shards["train"], num_workers=2, rank=0, world_size=2, batch_size=3, seed=5))
    )
    assert again == epochs[0][: len(again)]  # same seed and epoch: same order (rank 0 came first)


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_worker_counts_give_the_same_samples(pascal_shards):
    sets = []
    for workers in (0, 1, 3):
        loader = pascal_loader(pascal_shards["train"], num_workers=workers, batch_size=4)
        sets.append(sorted(keys_of(list(loader))))
    assert sets[0] == sets[1] == sets[2]


def test_resume_yields_exactly_the_remaining_batches(pascal_shards):
    def make():
        return pascal_loader(pascal_shards["train"], num_workers=2, rank=1, world_size=2, batch_size=2, seed=9)

    reference = make()
    reference.set_epoch(3)
    expected = list(reference)
    for k in (1, 3, 4):
        first = make()
        first.set_epoch(3)
        it = iter(first)
        for _ in range(k):
            next(it)
        state = first.state_dict()
        del it
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
        assert state["epoch"] == 3 and state["batches_consumed"] == k

        resumed = make()
        resumed.load_state_dict(state)
        resumed.set_epoch(3)  # the usual loop calls this again: it must keep the position
        rest = list(resumed)
        assert_batches_equal(rest, expected[k:])
        stats = resumed.stats
        assert stats["samples_resume_skipped"] == 2 * k
        assert stats["samples_read"] == 2 * (len(expected) - k)  # skipped samples were never decoded


def test_epoch_advances_and_state_checks_the_layout(pascal_shards):
    loader = pascal_loader(pascal_shards["train"], batch_size=4)
    first = keys_of(list(loader))
    second = keys_of(list(loader))  # iterating again moves to the next epoch
    assert loader.epoch == 1 and first != second and sorted(first) == sorted(second)
    state = loader.state_dict()
    assert all(isinstance(v, (int, str)) for v in state.values())
    other = pascal_loader(pascal_shards["train"], batch_size=2)
    with pytest.raises(ValueError, match="global_batch: saved 4, now 2"):
        other.load_state_dict(state)
    mid = dict(state, batches_consumed=2)
    other.load_state_dict(mid, strict=False)
    assert (other.epoch, other.batches_consumed) == (state["epoch"] + 1, 0)
    with pytest.raises(ValueError, match="version"):
        other.load_state_dict({**state, "version": 99})
    old = pascal_loader(pascal_shards["train"], batch_size=4)  # a checkpoint of the order before issue 25
    old.load_state_dict({**state, "version": 1, "batches_consumed": 2})
    assert (old.epoch, old.batches_consumed) == (state["epoch"] + 1, 0)


def test_validation_covers_every_sample_once_with_original_sizes(pascal_shards):
    total = read_manifest(pascal_shards["val"]).num_samples
    assert total == PASCAL["num_val"]
    keys, counts = [], []
    for rank in range(3):  # 10 samples on 3 ranks: ranks 1 and 2 pad one copy each
        loader = make_loader(
            pascal_shards["val"],
            dataset="pascal_context",
            tasks=["semseg", "normals"],
            split="val",
            img_size=(48, 64),
            batch_size=3,
            num_workers=2,
            rank=rank,
            world_size=3,
        )
        batches = list(loader)
        counts.append(len(batches))
        for b in batches:
            assert b["image"].shape[-2:] == (48, 64)
            h, w = b["semseg"].shape[-2:]
            assert (b["label_size"][:, 0].max(), b["label_size"][:, 1].max()) == (h, w)
            for i, (lh, lw) in enumerate(b["label_size"].tolist()):
                assert (b["semseg"][i, lh:, :] == 255).all() and (b["semseg"][i, :, lw:] == 255).all()
                assert (b["normals"][i, :, lh:, :] == 255).all()
        keys += valid_keys(batches)
        assert loader.stats["samples_padded"] == (0 if rank == 0 else 1)
    assert len(set(counts)) == 1
    assert sorted(keys) == sorted(set(keys)) and len(keys) == total
    sizes = {tuple(s) for b in batches for s in b["label_size"].tolist()}
    assert len(sizes) > 1  # original, varied resolutions


def test_rewind_restarts_an_abandoned_validation_pass(pascal_shards):
    """An evaluation capped at a few batches breaks out of the loop; the next one starts over."""
    loader = make_loader(
        pascal_shards["val"],
        dataset="pascal_context",
        tasks=["semseg"],
        split="val",
        img_size=(48, 64),
        batch_size=2,
        num_workers=1,
    )
    first_pass = [valid_keys([b]) for _, b in zip(range(2), loader)]
    loader.rewind()
    second_pass = [valid_keys([b]) for _, b in zip(range(2), loader)]
    third_pass = [valid_keys([b]) for _, b in zip(range(2), loader)]  # no rewind: continues
    assert second_pass == first_pass
    assert third_pass != first_pass


def test_official_protocol_resizes_labels(pascal_shards):
    loader = make_loader(
        pascal_shards["val"],
        dataset="pascal_context",
        tasks=["semseg", "human_parts"],
        split="val",
        img_size=(48, 64),
        batch_size=4,
        eval_protocol="official",
    )
    for b in loader:
        assert b["semseg"].shape[-2:] == (48, 64) and b["label_size"].tolist() == [[48, 64]] * len(b["__key__"])


def test_nyud_training_batches(nyud_shards):
    loader = make_loader(
        nyud_shards["train"],
        dataset="nyud",
        tasks=NYUD_TASKS,
        split="train",
        img_size=(40, 48),
        batch_size=3,
        num_workers=1,
    )
    batches = list(loader)
    assert len(batches) == NYUD["num_train"] // 3
    depth = torch.cat([b["depth"] for b in batches])
    assert depth.dtype == torch.float32 and (depth == 255).any()
    real = depth[depth != 255]
    assert real.min() > 0 and real.max() < 10  # metres, divided by scales 1-1.5
    assert set(torch.unique(torch.cat([b["semseg"] for b in batches])).tolist()) <= set(range(40)) | {255}


def test_bad_arguments_are_clear_errors(pascal_root, pascal_shards, tmp_path):
    subset = str(tmp_path / "semseg-only")
    convert("pascal_context", pascal_root, "val", subset, tasks=["semseg"])
    with pytest.raises(ValueError, match=r"has no labels for task\(s\) \['sal'\]"):
        make_loader(
            subset, dataset="pascal_context", tasks=["semseg", "sal"], split="val", img_size=(8, 8), batch_size=2
        )
    with pytest.raises(ValueError, match="holds 'pascal_context' shards"):
        make_loader(pascal_shards["val"], dataset="nyud", tasks=["semseg"], split="val", img_size=(8, 8), batch_size=2)
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        pascal_loader(pascal_shards["train"], batch_size=13, world_size=2)
    with pytest.raises(ValueError, match="split must be"):
        pascal_loader(pascal_shards["train"], split="test")
