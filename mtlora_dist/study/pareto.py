"""The Pareto plot: Δm against trainable parameters (log x), one point per method with its seed spread,
the front of methods no other beats on both axes drawn through them, the paper's published points as an
optional overlay (Swin-T, PASCAL-Context, 4 tasks: ``../shared/docs/mtlora-spec.md`` §9.1; the PEFT rows are
quoted from secondary sources, so they are drawn hollow)."""

from __future__ import annotations

from collections.abc import Sequence

from mtlora_dist.study.compare import Comparison, MethodRow

__all__ = ["pareto_front", "plot_pareto", "PAPER_POINTS"]

# (method, trainable parameters, Δm %, from the paper's own table)
PAPER_POINTS: tuple[tuple[str, float, float, bool], ...] = (
    ("single-task FT (4 models)", 112.62e6, 0.0, True),
    ("MTL full FT", 30.06e6, 2.23, True),
    ("MTLoRA r=16", 4.95e6, 1.35, True),
    ("MTLoRA r=32", 6.08e6, 2.16, True),
    ("MTLoRA r=64", 8.34e6, 2.55, True),
    ("Adapter", 11.24e6, -2.71, False),
    ("VL-Adapter", 4.74e6, -1.83, False),
    ("LoRA", 3.08e6, -0.54, False),
    ("BitFit", 2.85e6, -4.60, False),
    ("Compacter", 2.87e6, -2.17, False),
    ("VPT-deep", 3.43e6, -10.85, False),
    ("Polyhistor", 8.96e6, 2.34, False),
)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (fewer or equal parameters and a higher or
    equal Δm, better on one), ordered by parameters."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def plot_pareto(comparison: Comparison, paper: bool = False, title: str | None = None) -> bytes:
    """The plot as PNG bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: list[MethodRow] = [r for r in comparison.rows if r.delta_m is not None]
    fig, ax = plt.subplots(figsize=(8, 5.2), dpi=120)
    if paper:
        for name, params, dm, own in PAPER_POINTS:
            ax.scatter(params, dm, marker="s", s=28, facecolors="tab:gray" if own else "none", edgecolors="tab:gray")
            ax.annotate(name, (params, dm), fontsize=7, color="tab:gray", xytext=(4, -9), textcoords="offset points")
    xs = [r.trainable for r in rows]
    ys = [r.delta_m[0] for r in rows]
    errs = [r.delta_m[1] for r in rows]
    ax.errorbar(xs, ys, yerr=errs, fmt="o", color="tab:blue", ecolor="tab:blue", capsize=3, zorder=3)
    for r, x, y in zip(rows, xs, ys):
        ax.annotate(r.label, (x, y), fontsize=8, xytext=(5, 4), textcoords="offset points")
    front = pareto_front(list(zip(xs, ys)))
    handles = []
    if front:
        (line,) = ax.plot([xs[i] for i in front], [ys[i] for i in front], "-", color="tab:red", lw=1.5, zorder=2)
        line.set_label("Pareto front")
        handles.append(line)
    ax.set_xscale("log")
    ax.axhline(0.0, color="black", lw=0.6, ls=":")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("Δm % (vs single-task references)")
    ax.set_title(title or f"Δm vs trainable parameters (references: {comparison.reference_source})", fontsize=9)
    ax.grid(True, which="both", alpha=0.25)
    if paper:
        handles.append(ax.scatter([], [], marker="s", color="tab:gray", label="paper (Swin-T, PASCAL)"))
    if handles:
        ax.legend(handles=handles, fontsize=8, loc="lower right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
