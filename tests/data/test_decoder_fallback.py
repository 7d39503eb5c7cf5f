"""Without simplejpeg and pyspng (the bare GPU machine has neither) the loader decodes with PIL: the same
batches as asking for PIL, one warning line, and no sample lost.

The libraries are hidden from a real child process (and its DataLoader worker) by modules of the same
name on ``PYTHONPATH`` that raise ``ImportError``, as a missing package does."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

from mtlora_dist.data.shards.encoding import Decoders, installed

from datatest_utils import pascal_loader

LOADER_ARGS = {"img_size": (40, 56), "batch_size": 3, "num_workers": 1, "seed": 3}

CHILD = textwrap.dedent(
    """
    import sys
    import torch
    sys.path.insert(0, {tests!r})
    from datatest_utils import pascal_loader

    loader = pascal_loader({url!r}, **{args!r})
    batches = [{{k: v for k, v in b.items() if isinstance(v, torch.Tensor)}} for b in loader]
    torch.save(batches, {out!r})
    """
)


def _hide(folder, *modules: str) -> None:
    for name in modules:
        (folder / f"{name}.py").write_text(f'raise ImportError("No module named {name!r} (hidden by the test)")\n')


def test_missing_fast_decoders_fall_back_to_pil_with_one_line(pascal_shards, tmp_path):
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    _hide(hidden, "simplejpeg", "pyspng")
    out = tmp_path / "batches.pt"
    script = CHILD.format(tests=os.path.dirname(__file__), url=pascal_shards["train"], args=LOADER_ARGS, out=str(out))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hidden), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    notes = [line for line in proc.stderr.splitlines() if "decoding with PIL instead" in line]
    assert len(notes) == 1, proc.stderr[-3000:]
    assert "simplejpeg and pyspng not installed" in notes[0] and "pip install simplejpeg pyspng" in notes[0]

    fallback = torch.load(out, weights_only=True)
    expected = list(pascal_loader(pascal_shards["train"], jpeg="pil", png="pil", **LOADER_ARGS))
    assert len(fallback) == len(expected) > 0
    for got, want in zip(fallback, expected, strict=True):
        for key, value in got.items():
            torch.testing.assert_close(value, want[key], rtol=0, atol=0, msg=key)


def test_available_keeps_installed_libraries_and_pil():
    assert installed("simplejpeg") and installed("pyspng")  # the dev extra installs both
    assert Decoders().available() == Decoders()
    assert Decoders("pil", "pil").available() == Decoders("pil", "pil")
    assert not installed("simplejpeg_that_does_not_exist")
