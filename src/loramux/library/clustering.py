"""MBC, model-based clustering of a library's adapters (ALGORITHMS.md §4, arXiv 2405.11157).

Tasks whose adapters point the same way in parameter space are grouped; one adapter per group is
then trained on the union of its tasks (`loramux train --cluster`):

    flatten each adapter's LoRA factors -> zero the smallest-magnitude fraction (sparsity)
    -> truncated SVD to <= 64 dims (fewer with fewer adapters) -> L2-normalise
    -> cosine similarity matrix -> k-means (k-means++, several inits) on its rows
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .._atomic import atomic_write_json
from ..errors import LoramuxError
from .checks import read_peft_dir

if TYPE_CHECKING:
    from .library import Library


@dataclass(frozen=True)
class ClusterConfig:
    k: int
    sparsity: float = 0.5  # fraction of each flattened adapter zeroed (smallest magnitudes)
    svd_dims: int = 64
    n_init: int = 10  # k-means restarts
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k < 1:
            raise LoramuxError(f"k must be a positive integer; got {self.k!r}")
        if not 0 <= self.sparsity < 1:
            raise LoramuxError(f"sparsity must be in [0, 1); got {self.sparsity!r}")
        if self.svd_dims < 1 or self.n_init < 1:
            raise LoramuxError(f"svd_dims and n_init must be positive; got {self.svd_dims}, {self.n_init}")


@dataclass
class Clustering:
    names: list[str]  # adapters, in the order of `similarity` and `labels`
    labels: list[int]
    similarity: list[list[float]]
    config: ClusterConfig
    tasks: dict[str, list[str]] = field(default_factory=dict)  # adapter -> its tasks
    steps: dict[str, int] = field(default_factory=dict)  # adapter -> its training steps (None: unknown)

    @property
    def members(self) -> list[list[str]]:
        """Adapters per cluster, clusters ordered by their first member's position in `names`."""
        order: list[int] = []
        for label in self.labels:
            if label not in order:
                order.append(label)
        return [[n for n, l in zip(self.names, self.labels) if l == c] for c in order]

    def to_dict(self) -> dict:
        return {"names": self.names, "labels": self.labels, "members": self.members,
                "tasks": self.tasks, "steps": self.steps, "similarity": self.similarity,
                "config": asdict(self.config)}

    @classmethod
    def from_dict(cls, d: dict) -> "Clustering":
        return cls(d["names"], d["labels"], d["similarity"], ClusterConfig(**d["config"]), d.get("tasks", {}),
                   d.get("steps", {}))

    @classmethod
    def load(cls, path: str | Path) -> "Clustering":
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LoramuxError(f"{str(path)!r} is not a clustering written by `loramux library cluster` ({e})") from None


def adapter_matrix(library: "Library", names: list[str]) -> np.ndarray:
    """One row per adapter: all its LoRA factors flattened in a fixed (sorted key) order."""
    rows, layout = [], None
    for name in names:
        files = read_peft_dir(library.adapter_dir(name))
        keys = sorted(files.tensors)
        shape = [(k, tuple(files.tensors[k].shape)) for k in keys]
        if layout is None:
            layout = shape
        elif shape != layout:
            raise LoramuxError(f"MBC compares adapters of one shape; {name!r} differs from {names[0]!r} in its "
                               f"target modules or ranks")
        rows.append(np.concatenate([files.tensors[k].float().numpy().ravel() for k in keys]))
    return np.stack(rows)


def sparsify(X: np.ndarray, fraction: float) -> np.ndarray:
    """Zero the `fraction` of smallest-magnitude entries of each row."""
    if fraction <= 0:
        return X.copy()
    out = X.copy()
    n_zero = int(fraction * X.shape[1])
    for row in out:
        row[np.argpartition(np.abs(row), n_zero)[:n_zero]] = 0.0
    return out


def cluster_adapters(library: "Library", config: ClusterConfig, names: list[str] | None = None) -> Clustering:
    from sklearn.cluster import KMeans
    from sklearn.decomposition import TruncatedSVD

    names = sorted(names or library.routable())
    if config.k > len(names):
        raise LoramuxError(f"k={config.k} clusters from {len(names)} adapters; k must be at most the number of adapters")
    X = sparsify(adapter_matrix(library, names), config.sparsity)
    dims = min(config.svd_dims, len(names) - 1, X.shape[1] - 1)
    if dims >= 1:
        X = TruncatedSVD(n_components=dims, random_state=config.seed).fit_transform(X)
    X = X / np.clip(np.linalg.norm(X, axis=1, keepdims=True), 1e-12, None)
    S = X @ X.T
    labels = KMeans(n_clusters=config.k, init="k-means++", n_init=config.n_init,
                    random_state=config.seed).fit_predict(S)
    specs = {n: library.get(n) for n in names}
    return Clustering(names, [int(l) for l in labels], np.round(S, 6).tolist(), config,
                      {n: list(s.tasks) for n, s in specs.items()},
                      {n: s.training.steps for n, s in specs.items() if s.training is not None})


def save_clustering(clustering: Clustering, out_dir: str | Path) -> tuple[Path, Path]:
    """clustering.json (members, labels, similarity) and similarity.png (rows grouped by cluster)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "clustering.json", out / "similarity.png"
    atomic_write_json(json_path, clustering.to_dict())
    order = [clustering.names.index(n) for group in clustering.members for n in group]
    S = np.array(clustering.similarity)[np.ix_(order, order)]
    labels = [clustering.names[i] for i in order]
    fig, ax = plt.subplots(figsize=(1 + 0.5 * len(labels), 0.8 + 0.45 * len(labels)))
    im = ax.imshow(S, cmap="viridis", vmin=-1, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    edge = 0
    for group in clustering.members:  # outline each cluster's block
        ax.add_patch(plt.Rectangle((edge - 0.5, edge - 0.5), len(group), len(group), fill=False, color="red", lw=1.5))
        edge += len(group)
    fig.colorbar(im, ax=ax, label="cosine similarity")
    ax.set_title(f"MBC: {clustering.config.k} clusters (sparsity {clustering.config.sparsity})")
    fig.tight_layout()
    tmp = png_path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(png_path)
    return json_path, png_path
