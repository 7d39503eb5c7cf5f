"""Write the comparison report of a list of run folders: ``comparison.md``, ``.csv``, ``.json`` and
``pareto.png`` in one folder (local or s3://)."""

from __future__ import annotations

import os
import tempfile

from mtlora_dist.storage.fs import StorageOptions, join

__all__ = ["write_report", "runs_of"]


def runs_of(url: str, storage: StorageOptions | None = None) -> list[str]:
    """The run folders of ``url``: a sweep folder's points (its ``sweep.yaml``), else ``url`` itself."""
    from mtlora_dist.storage.fs import url_to_fs
    from mtlora_dist.study.grid import expand, load_preset
    from mtlora_dist.study.runner import SPEC_FILE

    fs, path = url_to_fs(join(url, SPEC_FILE), storage)
    if not fs.exists(path):
        return [url]
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, SPEC_FILE)
        fs.get_file(path, local)
        points = expand(load_preset(local))
    return [join(url, p.name) for p in points]


def write_report(
    run_dirs: list[str], out_dir: str, *, paper: bool = False, storage: StorageOptions | None = None
) -> str:
    """Compare ``run_dirs`` and write the files; returns the Markdown table with where the files went."""
    from mtlora_dist.storage.atomic import atomic_write, atomic_write_text
    from mtlora_dist.study.compare import compare, read_run
    from mtlora_dist.study.pareto import plot_pareto

    comparison = compare(read_run(r, storage) for r in run_dirs)
    table = comparison.to_markdown()
    atomic_write_text(join(out_dir, "comparison.md"), table, storage)
    atomic_write_text(join(out_dir, "comparison.csv"), comparison.to_csv(), storage)
    atomic_write_text(join(out_dir, "comparison.json"), comparison.to_json() + "\n", storage)
    atomic_write(join(out_dir, "pareto.png"), plot_pareto(comparison, paper=paper), storage)
    return f"{table}\nreport: {join(out_dir, 'comparison.md')} (.csv, .json) and {join(out_dir, 'pareto.png')}"
