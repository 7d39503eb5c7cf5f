"""What a set of figures was measured on: library versions, accelerator, CPUs; and whether every
third-party module the code imports can be imported here (a bare GPU machine lacks several).

    python benchmarks/env_report.py [--json out.json]

The modules are not a fixed list: :func:`imported_modules` reads every ``import`` statement (function
bodies included) of ``mtlora_dist/``, ``launch/`` and ``benchmarks/``, and :func:`import_check` imports
each one, so a missing dependency of a dependency (pydantic under DeepSpeed) or a broken build shows up
as the error it would raise in a step. Modules in :data:`OPTIONAL` have a fallback or serve a path the
GPU session does not take; the report lists them apart and they do not fail it. The exit status is 1
when a required module does not import. ``benchmarks/build_wheels.sh`` builds wheels of the missing
ones (see benchmarks/README.md). :func:`timm_check` fails the report when timm's version is outside
pyproject.toml's range or the Swin internals the model uses are missing (``gpu_session.sh`` then
installs the carried timm from ``.whl/fallback/``).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.metadata
import importlib.util
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("mtlora_dist", "launch", "benchmarks")  # the code the GPU session's steps run
# modules the session can do without: why
OPTIONAL = {
    "simplejpeg": "JPEG decoding falls back to PIL",
    "pyspng": "PNG decoding falls back to PIL",
    "s3fs": "only for s3:// data and run directories",
    "wandb": "the session runs with WANDB_MODE=disabled",
}

# import name -> the distribution to install for it; the ones the benchmarks and the trainer import
# (s3fs and wandb only for S3 data and online logging, which the GPU session does not use)
PACKAGES = {
    "torch": "torch",
    "timm": "timm",
    "numpy": "numpy",
    "PIL": "pillow",
    "cv2": "opencv-python-headless",
    "scipy": "scipy",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
    "yaml": "PyYAML",
    "safetensors": "safetensors",
    "fsspec": "fsspec",
    "deepspeed": "deepspeed",
    "hjson": "hjson",
    "pydantic": "pydantic",
    "pydantic_core": "pydantic-core",
    "annotated_types": "annotated-types",
    "typing_inspection": "typing-inspection",
    "cpuinfo": "py-cpuinfo",
    "msgpack": "msgpack",
    "ninja": "ninja",
    "psutil": "psutil",
    "einops": "einops",
    "packaging": "packaging",
    "hydra": "hydra-core",
    "omegaconf": "omegaconf",
    "antlr4": "antlr4-python3-runtime",
    "webdataset": "webdataset",
    "braceexpand": "braceexpand",
    "torchjd": "torchjd",
    "quadprog": "quadprog",
    "qpsolvers": "qpsolvers",
    "submitit": "submitit",
    "cloudpickle": "cloudpickle",
}
WHEEL_HINT = (
    "build their wheels where PyPI is reachable: `bash benchmarks/build_wheels.sh` (into .whl/); carry .whl "
    "and run `bash benchmarks/gpu_session.sh`, which installs them first (`python3 -m pip install --no-index "
    "--no-deps --target /tmp/site .whl/*.whl` and PYTHONPATH=/tmp/site); see benchmarks/README.md"
)


def missing(modules: list[str] | None = None) -> list[str]:
    """Distributions (pip names) of the ``modules`` (default: all of :data:`PACKAGES`) that cannot be imported."""
    names = []
    for module in modules if modules is not None else list(PACKAGES):
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            names.append(PACKAGES.get(module, module))
    return names


def _first_party() -> set[str]:
    """Names that resolve to this repository's own files (scripts beside each other, tests' helpers)."""
    names = {"mtlora_dist", "__future__"}
    for folder in ("launch", "benchmarks", "tests"):
        names |= {p.stem for p in (REPO / folder).glob("*.py")}
    return names


def imported_modules(roots: tuple[str, ...] = SCANNED) -> dict[str, list[str]]:
    """Third-party top-level modules imported anywhere under ``roots``: module -> files importing it."""
    skip = _first_party() | set(sys.stdlib_module_names)
    found: dict[str, set[str]] = {}
    for root in roots:
        for path in sorted((REPO / root).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in skip:
                        found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return {module: sorted(files) for module, files in sorted(found.items())}


def import_check(modules: dict[str, list[str]] | None = None) -> dict[str, dict]:
    """Import every module; ``{"failed": {module: error}, "optional_missing": {module: why}}``."""
    failed, optional = {}, {}
    for module, files in (modules if modules is not None else imported_modules()).items():
        try:
            importlib.import_module(module)
        except Exception as err:  # noqa: BLE001 - a broken install raises anything, not only ImportError
            message = f"{type(err).__name__}: {err} (imported by {files[0]}{' and others' if len(files) > 1 else ''})"
            if module in OPTIONAL:
                optional[module] = f"{OPTIONAL[module]}; {message}"
            else:
                failed[module] = message
    return {"failed": failed, "optional_missing": optional}


def timm_requirement() -> str:
    """timm's range in pyproject.toml (the model reaches into timm's Swin internals)."""
    import re

    text = (REPO / "pyproject.toml").read_text()
    found = re.search(r'"timm([^"]*)"', text)
    return found.group(1) if found else ""


def timm_check() -> dict:
    """Whether this timm runs the model: its version inside pyproject's range, and the internals
    ``mtlora_dist/models/mtlora_swin.py`` uses (``block._attn`` on a (B, H, W, C) map, keeping the
    shape; ``downsample.out_dim`` of each merge), on a tiny Swin with random weights."""
    out: dict = {"version": _version("timm"), "requirement": timm_requirement(), "problems": []}
    try:
        import timm
        import torch
        from packaging.specifiers import SpecifierSet

        out["path"] = os.path.dirname(timm.__file__)
        if out["version"] not in SpecifierSet(out["requirement"]):
            out["problems"].append(f"timm {out['version']} is outside pyproject.toml's timm{out['requirement']}")
        swin = timm.create_model(
            "swin_tiny_patch4_window7_224", pretrained=False, img_size=64, window_size=2, embed_dim=24,
            depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), num_classes=0,
        )  # fmt: skip
        block = swin.layers[0].blocks[0]
        if not callable(getattr(block, "_attn", None)):
            out["problems"].append("SwinTransformerBlock has no _attn method")
        else:
            x = torch.zeros(1, 16, 16, 24)
            if tuple(block._attn(block.norm1(x)).shape) != tuple(x.shape):
                out["problems"].append("SwinTransformerBlock._attn changed its output shape")
        if [getattr(stage.downsample, "out_dim", None) for stage in swin.layers[1:]] != [48, 96, 192]:
            out["problems"].append("PatchMerging has no out_dim (or another one)")
    except Exception as err:  # noqa: BLE001 - any failure means: this timm does not run the model
        out["problems"].append(f"{type(err).__name__}: {err}")
    out["passed"] = not out["problems"]
    return out


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def accelerator() -> dict:
    """CUDA, cuDNN and NCCL versions and the first GPU's name and memory (None where absent)."""
    import torch

    info: dict = {
        "cuda_available": torch.cuda.is_available(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    try:
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None
    except Exception as err:  # noqa: BLE001 - a torch built without NCCL
        info["nccl"] = f"unavailable ({type(err).__name__})"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_count=torch.cuda.device_count(),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
        )
    return info


def report() -> dict:
    import torch

    imports = import_check()
    timm = timm_check()
    return {
        "python": platform.python_version(),
        "executable": sys.executable,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        **accelerator(),
        "versions": {
            d: _version(d)
            for d in (
                "timm",
                "deepspeed",
                "hydra-core",
                "omegaconf",
                "pydantic",
                "numpy",
                "webdataset",
                "fsspec",
                "triton",
            )
        },
        "missing_packages": missing(),
        "import_failures": imports["failed"],
        "optional_missing": imports["optional_missing"],
        "timm_check": timm,
        "passed": not imports["failed"] and timm["passed"],
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    parser.add_argument("--check-timm", action="store_true", help="only the timm check: exit 1 when it fails")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import emit

    if args.check_timm:
        check = timm_check()
        print(f"timm {check['version']} ({check.get('path')}): " + ("; ".join(check["problems"]) or "usable"))
        sys.exit(0 if check["passed"] else 1)

    result = report()
    emit(result, args.json)
    for module, error in result["import_failures"].items():
        print(f"cannot import {module}: {error}", file=sys.stderr)
    if result["import_failures"]:
        print(f"To bring them: {WHEEL_HINT}", file=sys.stderr)
    if not result["timm_check"]["passed"]:
        print(f"timm cannot run the model: {'; '.join(result['timm_check']['problems'])}", file=sys.stderr)
    if not result["passed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
