"""Small pieces the benchmark scripts share."""

from __future__ import annotations

import json

import torch


def emit(result: dict | list, path: str | None) -> None:
    """Print the figures as JSON and also write them to ``path`` when given."""
    print(json.dumps(result, indent=2))
    if path:
        with open(path, "w") as fh:
            json.dump(result, fh, indent=2)


def random_targets(tasks, batch: int, size: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Label tensors of the right kinds for the multi-task loss (values do not matter for timing)."""
    targets = {t: torch.zeros(batch, size, size, dtype=torch.uint8, device=device) for t in tasks}
    if "normals" in targets:
        targets["normals"] = torch.nn.functional.normalize(torch.randn(batch, 3, size, size, device=device), dim=1)
    return targets
