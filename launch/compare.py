"""The comparison report over runs: per method each task's primary metric (mean ± std over seeds), Δm,
trainable parameters, step time and peak memory (Markdown, CSV, JSON) and the Pareto plot of Δm against
trainable parameters.

    python launch/compare.py runs/sweeps/demo                       # a sweep folder (its points)
    python launch/compare.py runs/a runs/b s3://bucket/runs/c --out reports/cmp --paper

Δm references: the single-task (one-task) runs among those compared, else the runs' eval.baselines, else
the dataset's registered single-task numbers (the paper's for PASCAL-Context).
"""

from __future__ import annotations

import argparse

import _cli


@_cli.friendly_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders or sweep folders (local or s3://)")
    parser.add_argument(
        "--out",
        help="where the report goes (default: <first folder>/report for one sweep folder, else reports/comparison)",
    )
    parser.add_argument("--paper", action="store_true", help="overlay the paper's published points on the plot")
    args = parser.parse_args(argv)

    from mtlora_dist.storage.fs import join
    from mtlora_dist.study.report import runs_of, write_report

    run_dirs = [r for url in args.runs for r in runs_of(url)]
    out = args.out or (
        join(args.runs[0], "report") if len(args.runs) == 1 and run_dirs != args.runs else "reports/comparison"
    )
    print(write_report(run_dirs, out, paper=args.paper))


if __name__ == "__main__":
    main()
