"""Session fixture: a real SLURM cluster (munged, slurmctld, two slurmd "nodes") on this machine.

The packages are installed with apt-get when missing (about 10-15 s on a fresh Debian machine, as root).
The tests skip, with the reason, only where that is impossible: no apt-get, not root, or
``MTLORA_SKIP_SLURM=1``. Deselect them with ``-m "not slurm"``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from slurm_cluster import SlurmCluster, SlurmUnavailable, ensure_installed  # noqa: E402


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory, request):
    """A running two-node cluster for the session, stopped (jobs cancelled, daemons killed by PID) at
    the end even when a test fails or the start-up itself fails half way."""
    if os.environ.get("MTLORA_SKIP_SLURM") == "1":
        pytest.skip("MTLORA_SKIP_SLURM=1")
    if os.geteuid() != 0:
        pytest.skip("the SLURM tests run slurmd, which needs root")
    try:
        seconds = ensure_installed(log=lambda msg: print(f"\n[slurm fixture] {msg}", flush=True))
    except SlurmUnavailable as err:
        pytest.skip(str(err))
    if seconds:
        print(f"[slurm fixture] packages installed in {seconds:.1f} s", flush=True)
    # a short root keeps the munge socket path far below the 108-byte limit of unix socket names
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    request.addfinalizer(cluster.stop)  # registered before start(): a half-started cluster is stopped too
    cluster.start()
    return cluster


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """Synthetic PASCAL-Context shards where ``data.synthetic.root`` finds them (made here once, not by
    every job's rank 0), in many small shards so that both ranks get some; shared by the slurm test modules."""
    from mtlora_dist.data.ingest.convert import convert
    from mtlora_dist.synthetic.datasets import generate

    root = tmp_path_factory.mktemp("slurm-data")
    dataset = root / "pascal_context"
    generate("pascal_context", str(dataset / "raw"), num_train=48, num_val=8, seed=0)
    for split in ("train", "val"):
        convert("pascal_context", str(dataset / "raw"), split, str(dataset / "shards" / split), shard_size_mb=0.2)
    return root
