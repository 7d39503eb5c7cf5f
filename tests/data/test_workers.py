"""Worker processes, pinned memory and persistent workers: the automatic worker count, the pin
decision, and exact per-epoch positions when the same workers serve several epochs."""

from __future__ import annotations

import io
import logging
import os
import subprocess

import pytest
import torch

import mtlora_dist.data.stream.loader as loader_mod
from mtlora_dist.config import ConfigError, DataConfig, load_config
from mtlora_dist.cpus import available_cpus, cpu_budget, local_world_size
from mtlora_dist.data.config import BatchGeometry
from mtlora_dist.data.shards.manifest import read_manifest
from mtlora_dist.data.shards.tarshards import iter_tar_samples
from mtlora_dist.data.stream.loader import should_pin_memory
from mtlora_dist.data.stream.plan import locate, make_worker_plan, shard_order

from datatest_utils import PASCAL, keys_of, pascal_loader, state_after

NO_ACCELERATOR = "ignore:'pin_memory' argument is set as true but no accelerator is found"


# --------------------------------------------------------------------------------- worker count


@pytest.mark.parametrize(
    ("cpus", "local_ranks", "workers", "threads"),
    [
        (1, 1, 1, 1),  # one CPU: still one worker (decoding overlaps the step), never 0 by default
        (2, 1, 1, 1),
        (3, 1, 2, 1),
        (10, 2, 4, 1),  # 5 CPUs per rank, one left for the training process
        (16, 1, 8, 8),  # workers capped; the threads get the rest
        (64, 1, 8, 56),  # issue 31: 8 workers and 56 threads, not 8 and 63
        (64, 8, 7, 1),
        (16, 8, 1, 1),
        (4, 8, 1, 1),  # fewer CPUs than local ranks
    ],
)
def test_one_budget_sizes_workers_and_threads_together(cpus, local_ranks, workers, threads):
    budget = cpu_budget(None, cpus=cpus, local_ranks=local_ranks, omp_threads=None)
    assert (budget.workers, budget.threads) == (workers, threads) and budget.auto_workers
    per_rank = max(1, cpus // local_ranks)
    assert budget.workers <= per_rank and (budget.workers + budget.threads <= per_rank or per_rank == 1)


def test_explicit_workers_and_omp_num_threads_win():
    assert (cpu_budget(2, cpus=16, local_ranks=2, omp_threads=None).threads) == 6  # 2 x (6 + 2) = 16
    assert cpu_budget(0, cpus=2, local_ranks=1, omp_threads=None).threads == 2
    assert cpu_budget(4, cpus=2, local_ranks=2, omp_threads=None).threads == 1  # never 0
    fixed = cpu_budget(None, cpus=64, local_ranks=1, omp_threads=3)
    assert fixed.threads == 3 and fixed.threads_from_env and fixed.workers == 8
    with pytest.raises(ValueError, match="num_workers is -1"):
        cpu_budget(-1, cpus=4, local_ranks=1)


def test_the_budget_reads_affinity_and_every_launchers_local_rank_count(monkeypatch):
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 96)  # the node has more; the cpuset wins
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cpu_budget(None).workers == 5
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert cpu_budget(None).workers == 8
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")  # srun: the same answer as the launchers' names
    assert local_world_size() == 4 and cpu_budget(None).workers == 2
    monkeypatch.setenv("LOCAL_SIZE", "3")  # the deepspeed launcher's name for it
    assert local_world_size() == 3 and cpu_budget(None).workers == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "6")  # torchrun's wins
    assert local_world_size() == 6
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "not-a-number")
    monkeypatch.delenv("LOCAL_SIZE")
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE")
    assert local_world_size() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # macOS/Windows: os.cpu_count()
    monkeypatch.setattr(os, "cpu_count", lambda: 24)
    assert available_cpus() == 24 and cpu_budget(None).workers == 5
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cpu_budget(None).threads == 2


def test_the_loader_uses_the_worlds_resolved_worker_count(pascal_shards, caplog):
    with caplog.at_level(logging.INFO, logger="mtlora_dist"):
        loader = pascal_loader(pascal_shards["train"], num_workers=2)
    assert loader.num_workers == 2
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("mtlora_dist")]
    assert len(messages) == 1 and "2 worker process(es), persistent" in messages[0]
    assert "pinned memory off" in messages[0]
    with pytest.raises(ValueError, match="num_workers must be a resolved count"):
        pascal_loader(pascal_shards["train"], num_workers=-1)


def test_config_accepts_the_automatic_default_and_an_int():
    assert DataConfig().num_workers is None
    assert load_config(None, ["data.num_workers=null"]).data.num_workers is None
    assert load_config(None, ["data.num_workers=3"]).data.num_workers == 3
    with pytest.raises(ConfigError, match="num_workers"):
        load_config(None, ["data.num_workers=many"])
    here = os.path.dirname(__file__)
    paper = os.path.join(here, "..", "..", "configs", "pascal_swin_t_r16.yaml")
    cfg = load_config(paper, ["data.train_url=/x", "data.val_url=/y"])
    assert cfg.data.num_workers is None  # the real-data configs size workers from the CPUs


# ---------------------------------------------------------------------------------------- pinning


def test_pin_decision_follows_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert should_pin_memory(None) is True and should_pin_memory("cpu") is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert should_pin_memory(None) is False and should_pin_memory(torch.device("cuda", 0)) is True


class _Recorder(torch.utils.data.DataLoader):
    made: list[dict] = []

    def __init__(self, *args, **kwargs):
        type(self).made.append(kwargs)
        super().__init__(*args, **kwargs)


@pytest.mark.filterwarnings(NO_ACCELERATOR)
@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_is_pinned_and_persistent(pascal_shards, monkeypatch, workers):
    monkeypatch.setattr(loader_mod, "DataLoader", _Recorder)
    _Recorder.made = []
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)  # "the device is CUDA"
        loader = pascal_loader(pascal_shards["train"], num_workers=workers)
    assert loader.pin_memory  # iterated without the patch: torch warns that it cannot pin, and does not
    for _ in range(2):  # two epochs, one DataLoader
        assert len(list(loader)) == len(loader)
    assert len(_Recorder.made) == 1
    made = _Recorder.made[0]
    assert made["pin_memory"] is True and made["num_workers"] == workers
    assert made.get("persistent_workers", False) is (workers > 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not pascal_loader(pascal_shards["train"], num_workers=workers).pin_memory


def test_workers_stay_alive_across_epochs(pascal_shards):
    loader = pascal_loader(pascal_shards["train"], num_workers=2, batch_size=4)
    pids = []
    for _ in range(3):
        assert len(list(loader)) == len(loader)
        workers = loader._loader._iterator._workers
        assert all(w.is_alive() for w in workers)
        pids.append([w.pid for w in workers])
    assert pids[0] == pids[1] == pids[2] and len(pids[0]) == 2
    loader.close()
    assert not any(w.is_alive() for w in workers)


# ------------------------------------------------------------------------------- exact positions


def _planned_batches(
    url: str,
    *,
    epoch: int,
    num_workers: int,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    shuffle_buffer: int = 128,
) -> list[list[str]]:
    """The keys of every batch of ``epoch``, straight from the plan (independent of any loader)."""
    manifest = read_manifest(url)
    names = []
    for shard in manifest.shards:
        with open(os.path.join(url, shard.name), "rb") as f:
            names.append([key for key, _ in iter_tar_samples(f)])
    order = shard_order(len(manifest.shards), seed, epoch, True)
    batches: dict[int, list[str]] = {}
    for worker in range(num_workers):
        plan = make_worker_plan(
            manifest.num_samples,
            BatchGeometry(batch_size, 1, world_size),
            rank=rank,
            num_workers=num_workers,
            worker=worker,
            seed=seed,
            epoch=epoch,
            shuffle=True,
            drop_last=True,
            shuffle_buffer=shuffle_buffer,
        )
        keys = [names[s][i] for s, i in locate(plan.positions, [s.num_samples for s in manifest.shards], order)]
        for j, size in zip(plan.batch_indices, plan.batch_sizes, strict=True):
            batches[j], keys = keys[:size], keys[size:]
    return [batches[j] for j in range(len(batches))]


def _batch_keys(batches) -> list[list[str]]:
    return [list(b["__key__"]) for b in batches]


def _roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_persistent_workers_yield_the_planned_samples_every_epoch(pascal_shards):
    url, kw = pascal_shards["train"], {"num_workers": 2, "batch_size": 2, "seed": 11}
    plans = [_planned_batches(url, epoch=e, num_workers=2, batch_size=2, seed=11) for e in range(5)]
    loader = pascal_loader(url, **kw)
    seen = []
    for epoch in range(4):  # the trainer's way: iterate again, the loader moves on by itself
        batches = list(loader)
        assert loader.epoch == epoch and loader._loader.persistent_workers
        assert _batch_keys(batches) == plans[epoch]
        keys = keys_of(batches)
        assert len(keys) == len(set(keys)) == PASCAL["num_train"]  # no duplicate, none missing
        seen.append(keys)
    assert all(sorted(k) == sorted(seen[0]) for k in seen)
    assert len({tuple(k) for k in seen}) == len(seen)  # a new order every epoch

    # set_epoch and load_state_dict on a loader whose workers are already running reach them too
    loader.set_epoch(1)
    assert _batch_keys(list(loader)) == plans[1]
    it = iter(loader)
    first = [next(it) for _ in range(3)]  # abandon epoch 2 after 3 batches
    assert _batch_keys(first) == plans[2][:3]
    del it
    assert _batch_keys(list(loader)) == plans[2][3:]  # iterating again continues the unfinished epoch
    loader.load_state_dict({**loader.state_dict(), "epoch": 0, "batches_consumed": 5})
    assert _batch_keys(list(loader)) == plans[0][5:]
    assert _batch_keys(list(loader)) == plans[1]


@pytest.mark.parametrize("k", [1, 4, 7])
def test_resume_mid_epoch_with_persistent_workers(pascal_shards, k):
    url, kw = pascal_shards["train"], {"num_workers": 2, "batch_size": 2, "seed": 11}
    plans = [_planned_batches(url, epoch=e, num_workers=2, batch_size=2, seed=11) for e in range(4)]
    first = pascal_loader(url, **kw)
    assert _batch_keys(list(first)) == plans[0]
    it = iter(first)
    for _ in range(k):
        next(it)
    state = _roundtrip(first.state_dict())
    assert (state["epoch"], state["batches_consumed"]) == (1, k)
    del it
    first.close()

    resumed = pascal_loader(url, **kw)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # the usual loop: keeps the position
    assert _batch_keys(list(resumed)) == plans[1][k:]
    assert _batch_keys(list(resumed)) == plans[2]  # the same workers go on to the next epochs
    assert _batch_keys(list(resumed)) == plans[3]
    assert resumed.stats["samples_resume_skipped"] == 2 * k


def test_a_resume_with_another_worker_count_continues_exactly(pascal_shards, monkeypatch):
    """The training order does not depend on the workers: a checkpoint of 2 workers resumes on an
    automatic 3 (or on 0) with the same batches; another global batch is refused."""
    url = pascal_shards["train"]
    plans = [_planned_batches(url, epoch=e, num_workers=2, batch_size=2, seed=11) for e in range(2)]
    first = pascal_loader(url, num_workers=2, batch_size=2, seed=11)
    state = state_after(first, 3)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)  # auto: 3 workers
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    resumed = pascal_loader(url, num_workers=None, batch_size=2, seed=11)
    resumed.load_state_dict(state)
    assert resumed.num_workers == 3
    assert _batch_keys(list(resumed)) == plans[0][3:]
    assert _batch_keys(list(resumed)) == plans[1]
    in_process = pascal_loader(url, num_workers=0, batch_size=2, seed=11)
    in_process.load_state_dict(state)
    assert _batch_keys(list(in_process)) == plans[0][3:]
    other = pascal_loader(url, num_workers=2, batch_size=4, seed=11)
    with pytest.raises(ValueError, match="global_batch: saved 2, now 4"):
        other.load_state_dict(state)


# ---------------------------------------------------------------------------------------- signals


def _signal_mask(pid: int, field: str) -> int:
    """A process's ``SigIgn`` (ignored) or ``SigBlk`` (blocked) signal set from /proc."""
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith(f"{field}:")).split()[1], 16)


def _has(mask: int, sig: int) -> bool:
    return bool(mask & (1 << (sig - 1)))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads signal masks from /proc")
def test_workers_leave_stop_signals_to_their_rank_and_survive_them(pascal_shards):
    """A stop signal sent to the whole process group must leave the stop to the main process: workers
    ignore SIGINT and SIGUSR1 and swallow a SIGTERM that another process sends (a launcher terminating
    the process tree), so they keep serving the epoch; their own parent's SIGTERM still ends them."""
    import signal

    url = pascal_shards["train"]
    plan = _planned_batches(url, epoch=0, num_workers=2, batch_size=2, seed=11)
    loader = pascal_loader(url, num_workers=2, batch_size=2, seed=11)
    it = iter(loader)
    batches = [next(it)]
    workers = loader._loader._iterator._workers
    for worker in workers:
        assert _has(_signal_mask(worker.pid, "SigIgn"), signal.SIGINT)
        assert _has(_signal_mask(worker.pid, "SigIgn"), signal.SIGUSR1)
        assert _has(_signal_mask(worker.pid, "SigBlk"), signal.SIGTERM)  # read by a thread: who sent it?
    assert not _has(_signal_mask(os.getpid(), "SigIgn"), signal.SIGTERM)  # the main process still handles it
    subprocess.run(["kill", "-TERM", str(workers[0].pid)], check=True)  # from another process, as a launcher
    subprocess.run(["kill", "-INT", str(workers[1].pid)], check=True)
    batches += list(it)
    assert _batch_keys(batches) == plan  # every batch, in order: no worker died
    assert all(w.is_alive() for w in workers)
    os.kill(workers[0].pid, signal.SIGTERM)  # from the parent, as torch's shutdown does: the worker ends
    workers[0].join(timeout=10)
    assert not workers[0].is_alive() and workers[0].exitcode == 0
    loader.close()
    assert not any(w.is_alive() for w in workers)
