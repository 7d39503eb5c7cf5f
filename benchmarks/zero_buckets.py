"""Peak memory of a ZeRO-1/2 step with DeepSpeed's 5e8-element buckets against buckets sized to the
trainable set (``deepspeed.bucket_size=0``, the default; docs/gpu.md "Buckets"), on 2 CPU ranks.

    python benchmarks/zero_buckets.py [--models quickstart swin_t_r64] [--stages 1 2] [--precision bf16]
        [--steps 3] [--json out.json]

Each row is one ``deepspeed --num_accelerators 2`` job of ``benchmarks/zero_stages.py``'s worker (the
real model, ``initialize_engine``, random inputs, the multi-task loss). Reported per rank: the bucket
buffers ZeRO allocated for the backward (what a GPU's allocator would hold), the process's peak virtual
size (every allocation) and peak RSS (the pages touched: a CPU commits only what is written).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from zero_stages import launch  # noqa: E402

MODELS = {  # name: (config, image size, batch)
    "quickstart": ("configs/quickstart.yaml", 64, 4),
    "swin_t_r64": ("configs/pascal_swin_t_r64.yaml", 224, 2),
}
BUCKETS = {"5e8 (DeepSpeed default)": 500_000_000, "sized to trainable": 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    out = tempfile.mkdtemp(prefix="zero-buckets-")
    for model in args.models:
        config, size, batch = MODELS[model]
        for stage in args.stages:
            for label, bucket in BUCKETS.items():
                tag = f"{model}|{label}|"
                overrides = (f"deepspeed.bucket_size={bucket}", f"deepspeed.precision={args.precision}")
                launch(stage, out, config, size, batch, args.steps, *overrides, tag=tag)
    rows = [json.load(open(os.path.join(out, f))) for f in sorted(os.listdir(out))]
    print("| model | ZeRO | buckets | rank | trainable | bucket (elements) | bucket buffers (MiB) | peak virtual (MiB) "
          "| peak RSS (MiB) | step (s) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        model, label, _ = r["tag"].split("|")
        print(
            f"| {model} | {r['stage']} | {label} | {r['rank']} | {r['trainable']:,} | {r['reduce_bucket_size']:,} | "
            f"{r['bucket_buffer_mib']:.1f} | {r['peak_vm_mib']:.0f} | {r['peak_rss_mib']:.0f} | {r['step_s']:.2f} |"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
