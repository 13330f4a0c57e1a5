"""PNG plots of an evaluation result (`evaluate`'s dict, or composite.json): per-task heatmap,
router confusion, top-p sweep, and accuracy vs inference cost where costs were measured."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(cm, names: list[str], path: str | Path, title: str = "router confusion") -> None:
    """Rows: the prompt's own adapter; columns: the adapter the router weighted most; row-normalised colour."""
    import numpy as np

    plt = _pyplot()
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(2 + 0.5 * len(names), 1.5 + 0.45 * len(names)))
    norm = cm / cm.sum(1, keepdims=True).clip(min=1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for i in range(len(names)):
        for j in range(len(names)):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("routed to (top-1 adapter)")
    ax.set_ylabel("prompt's task")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cost_points(strategies: dict) -> list[tuple[float, float, str]]:
    """One point per distinct (cost, score), labelled with every strategy on it: strategies that
    pick the same mixtures (an always-confident router and the oracle) would otherwise print their
    names on top of each other."""
    points: dict[tuple[float, float], list[str]] = {}
    for s, v in strategies.items():
        points.setdefault((round(v["cost_ratio"], 2), round(v["average"], 4)), []).append(s)
    return [(x, y, ", ".join(names)) for (x, y), names in points.items()]


def plot_results(result: dict, out_dir: str | Path, prefix: str = "eval") -> list[str]:
    """Write <prefix>_heatmap.png, and where the result has what they need <prefix>_router_confusion.png
    (a DLP strategy: p = 0.6 if it ran), <prefix>_top_p.png (two or more dlp_p<P>) and <prefix>_cost.png
    (every strategy with a `cost_ratio`). Returns the file names written."""
    import numpy as np

    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    strategies = result["strategies"]
    names = list(strategies)
    tasks = list(next(iter(strategies.values()))["per_task"])
    files = []

    grid = np.array([[strategies[s]["per_task"][t] for t in tasks] for s in names])
    fig, ax = plt.subplots(figsize=(2.5 + 0.7 * len(tasks), 1 + 0.4 * len(names)))
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), [f"{s} ({strategies[s]['average']:.3f})" for s in names], fontsize=8)
    fig.colorbar(im, ax=ax, label="score (each task's primary metric)")
    fig.tight_layout()
    fig.savefig(out / f"{prefix}_heatmap.png", dpi=110)
    plt.close(fig)
    files.append(f"{prefix}_heatmap.png")

    routing = result.get("routing", {})
    if routing:
        s = "dlp_p0.6" if "dlp_p0.6" in routing else next(iter(routing))
        r = routing[s]
        plot_confusion(r["confusion"], r["labels"], out / f"{prefix}_router_confusion.png",
                       title=f"{s}: top-1 adapter per test prompt (top-1 accuracy {r['top1_accuracy']:.3f})")
        files.append(f"{prefix}_router_confusion.png")

    sweep = sorted((float(s[5:]), v["average"]) for s, v in strategies.items() if s.startswith("dlp_p"))
    if len(sweep) >= 2:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([p for p, _ in sweep], [a for _, a in sweep], marker="o", label="DLP")
        for ref in ("oracle", "uniform", "base"):
            if ref in strategies:
                ax.axhline(strategies[ref]["average"], ls="--", lw=1, label=ref, color=f"C{1 + len(ax.lines)}")
        ax.set_xlabel("top-p")
        ax.set_ylabel("average score")
        ax.legend(fontsize=8)
        sizes = [(float(s[5:]), r["mean_adapters"]) for s, r in routing.items()
                 if s.startswith("dlp_p") and "mean_adapters" in r]
        if sizes:  # what each p costs: a flat score curve with flat mixture sizes means the router is sure
            twin = ax.twinx()
            sizes.sort()
            twin.plot([p for p, _ in sizes], [k for _, k in sizes], marker="s", ls=":", color="grey")
            twin.set_ylabel("adapters per prompt (mean)", color="grey")
        fig.tight_layout()
        fig.savefig(out / f"{prefix}_top_p.png", dpi=110)
        plt.close(fig)
        files.append(f"{prefix}_top_p.png")

    costed = {s: v for s, v in strategies.items() if v.get("cost_ratio") is not None}
    if costed:
        fig, ax = plt.subplots(figsize=(6, 4))
        for x, y, label in cost_points(costed):
            ax.scatter(x, y)
            ax.annotate(label, (x, y), xytext=(3, 3), textcoords="offset points", fontsize=7)
        ax.set_xlabel("forward cost / base")
        ax.set_ylabel("average score")
        fig.tight_layout()
        fig.savefig(out / f"{prefix}_cost.png", dpi=110)
        plt.close(fig)
        files.append(f"{prefix}_cost.png")
    return files
