"""keep_freed_memory: large tensors allocated again and again stop page-faulting (in a fresh process,
since the setting is process-wide)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = r"""
import json, resource, sys, torch
from mtlora_dist.engine.host_memory import keep_freed_memory
applied = keep_freed_memory()
def faults_of_five_64mib_tensors():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.ones(16 * 1024 * 1024)  # 64 MiB, touched, then freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
for _ in range(3):  # the first rounds grow the heap
    faults_of_five_64mib_tensors()
print(json.dumps({"applied": applied, "faults": faults_of_five_64mib_tensors()}))
"""


def _probe(**env):
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_memory_is_reused_without_page_faults():
    result = _probe()
    assert result["applied"] is True
    assert result["faults"] < 100  # 4 KiB pages: 81,920 faults for five fresh 64 MiB tensors


def test_opt_out_leaves_the_allocator_alone():
    assert _probe(MTLORA_KEEP_FREED_MEMORY="0")["applied"] is False
