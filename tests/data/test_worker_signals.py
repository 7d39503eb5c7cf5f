"""A DataLoader worker whose rank dies mid-handover stays quiet (the rank's exit is reported once,
elsewhere); anything else its threads raise is still printed. Reproduced with multiprocessing's own
resource sharer, which is what hands a batch's shared memory from a worker to its rank."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import os, sys, time
from multiprocessing import connection, current_process, resource_sharer
if sys.argv[1] == "quiet":
    from mtlora_dist.data.stream.worker_signals import quiet_when_the_rank_vanishes
    quiet_when_the_rank_vanishes()
read_end, _ = os.pipe()
handed = resource_sharer.DupFd(read_end)  # a worker offering a file descriptor to its rank
address, _ = handed._id
connection.Client(address, authkey=current_process().authkey).close()  # the rank dies before taking it
time.sleep(0.5)
sys.excepthook(ValueError, ValueError("another failure"), None)  # not the rank's death: still reported
print("worker still running")
"""


@pytest.mark.parametrize("mode", ["plain", "quiet"])
def test_a_rank_dying_mid_handover_leaves_no_traceback_in_its_worker(mode):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "worker still running" in proc.stdout, proc.stderr
    assert "ValueError: another failure" in proc.stderr
    if mode == "plain":  # what the worker printed before
        assert "EOFError" in proc.stderr and "resource_sharer.py" in proc.stderr
    else:
        assert "EOFError" not in proc.stderr and "resource_sharer" not in proc.stderr, proc.stderr
