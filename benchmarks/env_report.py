"""What a set of figures was measured on: library versions, accelerator, CPUs; and which of the
Python packages the project needs are missing (a bare GPU machine lacks several).

    python benchmarks/env_report.py [--json out.json]

Missing packages are looked up without importing them (``importlib.util.find_spec``), so the report
works on a machine where importing DeepSpeed would fail. ``benchmarks/build_wheels.sh`` builds
wheels of the missing ones (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import sys
import time

# import name -> the distribution to install for it; the ones the benchmarks and the trainer import
# (s3fs and wandb only for S3 data and online logging, which the GPU session does not use)
PACKAGES = {
    "torch": "torch",
    "timm": "timm",
    "numpy": "numpy",
    "PIL": "pillow",
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
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import emit

    emit(report(), args.json)


if __name__ == "__main__":
    main()
