"""Shared start-up for the entry points: the checkout on ``sys.path``, the arguments every config-driven
script takes (``--config``, ``--cfg job``, a ``--help`` that lists the config groups and the most used
keys), and known failures turned into one clear message and exit status 2 instead of a traceback.

Nothing here imports torch or DeepSpeed: a script parses and checks its config first, then imports them.
Exit status: 0 done, 2 a known failure (configuration, data, storage, checkpoint) with one message,
3 stopped by a signal after writing a checkpoint (launch/train.py), 130 interrupted by Ctrl-C elsewhere
(one line); a traceback means a bug.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import sys
from collections.abc import Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EXIT_KNOWN_FAILURE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a command ended by Ctrl-C

# (key, what it does): the keys most runs set, shown by --help.
MOST_USED_KEYS = (
    ("run_dir", "where checkpoints, metrics.jsonl, config.yaml and reports go (folder or s3://bucket/prefix)"),
    ("data.train_url / data.val_url", "webdataset shards (folder or s3:// prefix with manifest.json)"),
    ("data.batch_size", "per rank, per micro-step"),
    ("data.num_workers", "DataLoader workers per loader; null = sized from the CPUs"),
    ("max_steps / epochs", "optimizer steps (0: epochs x steps per epoch)"),
    ("steps_per_job", "stop with a checkpoint after this many steps in one job (0: no limit)"),
    ("deepspeed.zero_stage", "0, 1, 2 or 3"),
    ("deepspeed.precision", "fp32, bf16, fp16 or auto (bf16 on a GPU that has it, else fp32)"),
    ("deepspeed.gradient_accumulation_steps", "micro-steps per optimizer step"),
    ("checkpoint.every / eval.every", "steps between checkpoints / evaluations (0: only at the end)"),
    ("checkpoint.resume=false", "start over: refused on a used run_dir unless checkpoint.overwrite=true deletes it"),
    ("logging.wandb.mode", "offline, online or disabled"),
    ("model.pretrained", "path of the backbone's ImageNet weights"),
    ("seed", "initial weights, augmentation and data order"),
)
_SWEEP_HINT = (
    "sweeps (-m/--multirun) are run by launch/sweep.py, each point in its own run_dir, here or on SLURM, e.g.\n"
    "  python launch/sweep.py --config configs/zero2.yaml --sweep-dir runs/sweeps/ranks adapter=mtlora_r16,mtlora_r32 "
    "seed=0,1 [--slurm]\n(docs/study.md)"
)


def config_epilog() -> str:
    """The config groups with their options, and the most used keys (for ``--help``)."""
    from mtlora_dist.config import PACKAGE_CONFIGS, group_options

    groups = group_options([PACKAGE_CONFIGS])
    recipes = groups.pop("", [])
    width = max(len(k) for k, _ in MOST_USED_KEYS)
    lines = [
        f"recipes (--config configs/NAME.yaml): {', '.join(recipes)}",
        "",
        "config groups (GROUP=OPTION replaces the recipe's choice, e.g. adapter=mtlora_r16):",
    ]
    lines += [f"  {group + '=':<12} {' | '.join(options)}" for group, options in groups.items()]
    lines += ["", "most used keys (KEY=VALUE; any schema key works, see `--cfg job` for all of them):"]
    lines += [f"  {key:<{width}}  {what}" for key, what in MOST_USED_KEYS]
    lines += [
        "",
        "credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (never the command line).",
        (
            "exit status: 0 done, 2 configuration/data/storage/checkpoint problem (one message), "
            "3 stopped by a signal after a checkpoint, 130 interrupted by Ctrl-C outside training (one line)."
        ),
    ]
    return "\n".join(lines)


def config_parser(doc: str, *, config_help: str, overrides_help: str) -> argparse.ArgumentParser:
    """The parser of a config-driven script: ``--config``, ``--cfg job``, ``-m`` (refused), overrides."""
    parser = argparse.ArgumentParser(
        description=doc, epilog=config_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=None, help=config_help)
    parser.add_argument(
        "-c",
        "--cfg",
        choices=["job"],
        default=None,
        help="print the resolved config (credentials masked) and exit, as Hydra apps do",
    )
    parser.add_argument(
        "-m",
        "--multirun",
        action="store_true",
        help="not supported here: sweeps are run by launch/sweep.py (docs/study.md)",
    )
    parser.add_argument("overrides", nargs="*", help=overrides_help)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, then refuse what no run should start with: a sweep, or a credential on the command line."""
    args = parser.parse_args(argv)
    from mtlora_dist.config import ConfigError, refuse_secret_overrides

    if args.multirun:
        raise ConfigError(_SWEEP_HINT)
    refuse_secret_overrides(args.overrides)
    return args


def print_or_prepare(args: argparse.Namespace, cfg, *, needs_data: bool = True) -> bool:
    """With ``--cfg job``, print the resolved config and return True (nothing else to do). Otherwise
    check the data settings and the buckets of the run_dir and data URLs, and silence the libraries' start-up noise (``engine/quiet.py``), before
    torch and DeepSpeed load, and return False."""
    if args.cfg:
        print_config(cfg)
        return True
    from mtlora_dist.config import ConfigError, check_data

    if needs_data:
        check_data(cfg.data)
    pretrained = cfg.model.pretrained
    if pretrained and not os.path.isfile(pretrained):  # found now, not after ~20 s of loading torch and the model
        raise ConfigError(
            f"model.pretrained '{pretrained}' does not exist; set model.pretrained to a local timm Swin checkpoint "
            "file, or null for random weights"
        )
    if needs_data:
        from mtlora_dist.storage.buckets import require_buckets

        urls = {"run_dir": cfg.run_dir, "data.train_url": cfg.data.train_url, "data.val_url": cfg.data.val_url}
        require_buckets(urls, cfg.data.storage)  # a missing bucket or refused key: before the model is built
    from mtlora_dist.engine.quiet import quiet_third_party

    quiet_third_party()
    return False


def prepare_training(cfg) -> None:
    """Before training starts (and before torch loads): the run_dir's state agrees with what the command asks
    (``engine/run_dir.py``: a used run_dir with ``checkpoint.resume=false`` is refused, a saved config.yaml
    that is not plain YAML too), and a run that will cost hours on a CPU says so."""
    from mtlora_dist.engine.run_dir import check_run_dir

    check_run_dir(cfg, _rank())
    if _rank() == 0 and not _gpu_visible():
        from mtlora_dist.engine.console import cpu_cost

        notice = cpu_cost(cfg)
        if notice:
            print(notice, flush=True)


def _gpu_visible() -> bool:
    """A CUDA device this process may use, judged without importing torch (the driver's device files)."""
    if os.environ.get("DS_ACCELERATOR") == "cpu" or os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")


@contextlib.contextmanager
def mismatch_explained(cfg, run_dir: str) -> Iterator[None]:
    """A checkpoint of another configuration: its message, led by the config keys that differ."""
    from mtlora_dist.checkpoint import CheckpointMismatchError

    try:
        yield
    except CheckpointMismatchError as err:
        raise CheckpointMismatchError(explain_mismatch(err, cfg, run_dir)) from None


def print_config(cfg) -> None:
    """``--cfg job``: the resolved config as YAML, credentials masked."""
    from mtlora_dist.config import to_yaml

    sys.stdout.write(to_yaml(cfg))
    sys.stdout.flush()


# -- known failures ------------------------------------------------------------------------------------------
# (module, class): looked up in sys.modules when an error arrives, so the check imports nothing heavy (an
# exception of a class whose module was never imported cannot have been raised).
_KNOWN = {
    "config": (
        ("mtlora_dist.config", "ConfigError"),
        ("builtins", "FileNotFoundError"),
        ("mtlora_dist.models.pretrained", "PretrainedWeightsError"),
    ),
    "checkpoint": (("mtlora_dist.checkpoint.format", "CheckpointError"),),
    "data": (
        ("mtlora_dist.data.errors", "DataError"),
        ("mtlora_dist.storage.retry", "StorageUnavailableError"),
        ("mtlora_dist.storage.buckets", "StorageAccessError"),
        ("builtins", "PermissionError"),  # a file or an object store that refuses us: the user's to fix
    ),
    "peer": (("mtlora_dist.comm", "PeerLostError"),),  # another rank died: its own output has the cause
}
# A rank that stops because another one died reports 1 ("an error"), not 2: nothing in the configuration
# is wrong, and a job scheduler should treat it like the dead rank's failure.
EXIT_STATUS = {"config": EXIT_KNOWN_FAILURE, "checkpoint": EXIT_KNOWN_FAILURE, "data": EXIT_KNOWN_FAILURE, "peer": 1}
_NETWORK_MODULES = ("botocore", "aiobotocore", "aiohttp")


def known_failure(err: BaseException) -> str | None:
    """``'config'``, ``'checkpoint'``, ``'data'`` or ``'peer'`` for failures a user can act on; ``None`` for bugs."""
    for kind, classes in _KNOWN.items():
        for module, name in classes:
            cls = getattr(sys.modules.get(module), name, None)
            if cls is not None and isinstance(err, cls):
                return kind
    if (type(err).__module__ or "").startswith(_NETWORK_MODULES):
        return "data"  # an object-store error that no layer wrapped: still the user's endpoint, not a bug
    return None


def failure_message(err: BaseException) -> str:
    """The error's own message; a DataLoader worker's re-raised error carries the worker's traceback in its
    text (``Caught X in DataLoader worker process 0. Original Traceback ...``): keep the last message only."""
    text = str(err).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        name = re.escape(type(err).__name__)
        found = list(re.finditer(rf"^(?:[\w.]+\.)?{name}: ", text, flags=re.MULTILINE))
        if found:
            text = text[found[-1].end() :].strip()
    if (type(err).__module__ or "").startswith(_NETWORK_MODULES):
        from mtlora_dist.storage.fs import describe_endpoint

        text = (
            f"object storage at {describe_endpoint()} failed: {type(err).__name__}: {text}; check that the S3 "
            "server is running and reachable, the endpoint URL and the credentials"
        )
    if isinstance(err, PermissionError) and "credential" not in text.lower():
        from mtlora_dist.storage.fs import describe_endpoint

        text = (
            f"permission denied: {text}; for s3:// URLs check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY at "
            f"{describe_endpoint()} and the bucket's permissions; for files, their owner and mode"
        )
    from mtlora_dist.storage.fs import redact_userinfo

    return redact_userinfo(text)


def _rank() -> int:
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def report_failure(err: BaseException, kind: str) -> None:
    """One message per job: rank 0 prints configuration and checkpoint errors (every rank has the same);
    data and storage errors and lost peers can differ per rank, so every rank prints its own, prefixed
    with its rank."""
    rank = _rank()
    if rank == 0:
        print(f"error: {failure_message(err)}", file=sys.stderr, flush=True)
    elif kind in ("data", "peer"):
        print(f"error (rank {rank}): {failure_message(err)}", file=sys.stderr, flush=True)


def friendly_errors(main):
    """Exit with status 2 and one message for a known failure, 130 and one line for a Ctrl-C that reached
    Python (training installs its own handler: a checkpoint and 3); let bugs raise with their traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            if _rank() == 0:
                script = os.path.basename(sys.argv[0]) or "the command"
                print(f"\nstopped: Ctrl-C (SIGINT) interrupted {script} before it finished; what it had not written "
                      "yet is not written (rerun the same command)", file=sys.stderr, flush=True)  # fmt: skip
            sys.exit(EXIT_INTERRUPTED)
        except Exception as err:  # noqa: BLE001 - classified; anything unknown is re-raised
            kind = known_failure(err)
            if kind is None:
                raise
            report_failure(err, kind)
            sys.exit(EXIT_STATUS[kind])

    return wrapper


# -- a checkpoint of another configuration ------------------------------------------------------------------
# What decides a checkpoint's contents: the keys compared with the run's saved config.yaml.
CHECKPOINT_KEYS = ("model.", "adapter.", "trainable.", "data.dataset", "data.tasks", "seed")


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out: dict = {}
        for key, sub in value.items():
            out.update(_flatten(sub, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def config_differences(saved: dict, current: dict, keys: tuple[str, ...] = CHECKPOINT_KEYS) -> list[str]:
    """``key: <saved> in the run, <current> here`` for every key under ``keys`` that differs."""
    old, new = _flatten(saved), _flatten(current)
    names = sorted(k for k in set(old) | set(new) if k.startswith(keys))
    return [
        f"{k}: {old.get(k, '<absent>')!r} in the run, {new.get(k, '<absent>')!r} here"
        for k in names
        if old.get(k, "<absent>") != new.get(k, "<absent>")
    ]


def _saved_config(run_dir: str, storage) -> dict | None:
    import yaml

    from mtlora_dist.storage.fs import join, url_to_fs

    try:
        fs, path = url_to_fs(join(run_dir, "config.yaml"), storage)
        with fs.open(path, "r") as fh:
            return yaml.safe_load(fh)
    except Exception:  # noqa: BLE001 - no saved config: the checkpoint's own message stands alone
        return None


def explain_mismatch(err: BaseException, cfg, run_dir: str) -> str:
    """The checkpoint's mismatch message, led by the config keys that differ from the run's config.yaml."""
    from omegaconf import OmegaConf

    saved = _saved_config(run_dir, cfg.data.storage)
    current = OmegaConf.to_container(OmegaConf.structured(cfg))
    differences = config_differences(saved, current) if isinstance(saved, dict) else []
    if not differences:
        return str(err)
    return (
        f"the checkpoints in {run_dir} were written with another configuration; these config keys differ from "
        f"{run_dir}/config.yaml:\n  " + "\n  ".join(differences) + "\nUse the run's values for those keys, or "
        "start a new run_dir."
    )


def split_cli_keys(args: list[str], keys: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    """Take ``key=value`` arguments whose key is in ``keys`` (e.g. ``checkpoint=``, ``out=``: not config
    keys) out of ``args``; the rest are config overrides."""
    picked, rest = {}, []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key in keys:
            picked[key] = value
        else:
            rest.append(arg)
    return picked, rest
