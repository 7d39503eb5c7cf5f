"""Run a sweep: a grid of training runs (methods x ranks x seeds x any key), here one after another or
on SLURM as one job per point, each point in its own run_dir, then the comparison report.

    python launch/sweep.py --preset demo                              # the paper's table on a CPU, minutes
    python launch/sweep.py --config configs/quickstart.yaml --sweep-dir runs/sweeps/ranks \\
        adapter.shared_rank=4,8,16 seed=0,1 max_steps=100
    python launch/sweep.py --preset table1 --sweep-dir /shared/sweeps/t1 --slurm --slurm-partition gpu
    python launch/sweep.py --sweep-dir runs/sweeps/ranks              # continue a sweep (done points skipped)
    python launch/sweep.py --sweep-dir runs/sweeps/ranks --jobs 2     # two points at a time, CPUs split

Sweep values use Hydra's override grammar (``key=a,b``, ``key=range(0,3)``, ``data.tasks=[semseg],[sal]``);
``--grid`` starts another grid whose points are added (the single-task models of a table are one run per
task: ``--grid method=single_task data.tasks=[semseg],[sal] seed=0,1``). Every point's config is checked
before anything runs. A point that finished is never run again; a stopped one resumes from its checkpoint.

Exit status: 0 every point done (and reported), 1 some point failed (the others ran), 2 a bad sweep or
config (one message, nothing run), 3 stopped by a signal with the running point's checkpoint written.
"""

from __future__ import annotations

import argparse
import os
import sys

import _cli


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", help="a sweep under configs/sweep/ (e.g. demo, table1) or a sweep YAML path")
    parser.add_argument("--config", help="the recipe every point starts from (default: the preset's, else quickstart)")
    parser.add_argument("--sweep-dir", help="where the points' run_dirs go (default: runs/sweeps/<preset>)")
    parser.add_argument("--slurm", action="store_true", help="submit one SLURM job per point (submitit) and exit")
    parser.add_argument("--slurm-partition", default=None)
    parser.add_argument("--slurm-time", type=int, default=None, help="minutes per job (default 60)")
    parser.add_argument("--ranks", type=int, default=1, help="training processes per point (torchrun, one node)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="local points trained at once, the CPUs split between them (default: the preset's local_jobs, else 1)",
    )
    parser.add_argument(
        "--slurm-gpus", type=int, default=None, help="GPUs per point (one node; default --ranks on GPU partitions)"
    )
    parser.add_argument("--wait", action="store_true", help="with --slurm: wait for every job, then report")
    parser.add_argument("--no-report", action="store_true", help="skip the comparison report at the end")
    parser.add_argument("--paper", action="store_true", help="overlay the paper's published points on the plot")
    parser.add_argument("--list", action="store_true", help="print the points (and which are done) and exit")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE or KEY=A,B,... (a swept key); '--grid' separates grids")
    return parser


def _split_grids(argv: list[str]) -> tuple[list[str], list[list[str]]]:
    """``a=1 --grid b=1,2 --grid c=3`` -> (["a=1"], [["b=1,2"], ["c=3"]]): argparse cannot repeat a
    positional list, so the grids are cut out before it parses."""
    head, grids, current = [], [], None
    for arg in argv:
        if arg == "--grid":
            current = []
            grids.append(current)
        elif current is not None and not arg.startswith("--"):
            current.append(arg)
        else:
            current = None if arg.startswith("--") else current
            head.append(arg)
    return head, grids


@_cli.friendly_errors
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    head, extra_grids = _split_grids(argv)
    args = _parser().parse_args(head)

    from mtlora_dist.config import ConfigError, load_config
    from mtlora_dist.study.grid import SweepSpec, expand, load_preset
    from mtlora_dist.study.runner import SPEC_FILE, SweepRun, is_done

    sweep_dir = args.sweep_dir or (
        os.path.join("runs", "sweeps", os.path.basename(args.preset).removesuffix(".yaml")) if args.preset else None
    )
    if args.preset:
        spec = load_preset(args.preset)
    elif sweep_dir and os.path.isfile(os.path.join(sweep_dir, SPEC_FILE)) and not args.overrides and not extra_grids:
        spec = load_preset(os.path.join(sweep_dir, SPEC_FILE))  # continue the sweep saved there
    else:
        spec = SweepSpec(config="quickstart")
    if sweep_dir is None:
        raise ConfigError("pass --sweep-dir (where the points' run_dirs go) or --preset NAME")
    if args.config:
        spec.config = args.config
    if args.jobs is not None:
        if args.jobs < 1:
            raise ConfigError(f"--jobs is {args.jobs}; pass 1 or more (points trained at once)")
        spec.local_jobs = args.jobs
    swept = [o for o in args.overrides if _is_sweep(o)]
    spec.overrides += [o for o in args.overrides if not _is_sweep(o)]
    grids = ([swept] if swept else []) + extra_grids
    if grids:
        spec.grids = grids if not args.preset else spec.grids + grids
    points = expand(spec)
    for point in points:  # every point's config composed and validated before anything runs
        try:
            load_config(spec.config_path(), list(point.overrides))
        except ConfigError as err:
            raise ConfigError(f"sweep point {point.name}: {err}") from None
    run = SweepRun(spec, sweep_dir, points, ranks=args.ranks)

    if args.list:
        for point in points:
            print(f"{'done ' if is_done(run.run_dir(point)) else 'to do'}  {point.name}")
        return
    if args.slurm:
        params = {
            "timeout_min": 60,
            "nodes": 1,
            "tasks_per_node": 1,
            "slurm_signal_delay_s": 120,
            "slurm_max_num_timeout": 20,
        }
        params.update(spec.slurm)
        if args.slurm_partition:
            params["slurm_partition"] = args.slurm_partition
        if args.slurm_time:
            params["timeout_min"] = args.slurm_time
        if args.slurm_gpus:
            params["gpus_per_node"] = args.slurm_gpus
        jobs = run.submit_slurm(params)
        if not args.wait:
            print(f"{len(jobs)} job(s) submitted; when they are done: python launch/compare.py {sweep_dir}")
            return
        for job in jobs:
            try:
                job.result()
            except Exception as err:  # noqa: BLE001 - a failed point is reported, the others still count
                print(f"job {job.job_id} failed: {str(err).strip().splitlines()[-1]}")
        status = 0 if not run.pending() else 1
    else:
        status = run.run_local()
    if status == 3:
        sys.exit(3)
    if not args.no_report:
        from mtlora_dist.study.report import write_report

        done = [run.run_dir(p) for p in points if is_done(run.run_dir(p))]
        if done:
            print(write_report(done, os.path.join(sweep_dir, "report"), paper=args.paper))
    sys.exit(status)


def _is_sweep(override: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides([override])[0].is_sweep_override()


if __name__ == "__main__":
    main()
