"""``eval=embed``: what the encoder does to the test set, to look at rather than to score.

The test-set features (no augmentation, encoder in eval mode, as the kNN and cached linear
protocols see them) are saved to ``embeddings.pt`` and drawn as 2-D t-SNE maps coloured by class.
With ``repr=combined`` there is one map per part of the representation (avgpool, each tap alone)
and one of the whole, so one can see which layer separates the classes. Every map draws the same
seeded subset of ``eval.max_points`` test images, so t-SNE stays within a minute on a CPU; each
map's features are standardised per dimension (as the linear probe sees them) and reduced by PCA
to ``eval.pca_dim`` dimensions first, the usual way to make t-SNE fast and less noisy.

scikit-learn and matplotlib are the optional ``embed`` extra, imported only here and only when
``eval=embed`` runs.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from byol.core.checkpoint import atomic_torch_save
from byol.core.data import ImageTensors
from byol.core.errors import ConfigError, DataError
from byol.core.features import COMBINED, autocast_dtype, extract_features
from byol.jobs.figures import literal_text, pyplot, save_png

EMBEDDINGS_FILE = "embeddings.pt"
EMBEDDINGS_FORMAT = "byol-embeddings-v1"
EXTRA = "embed"  # pyproject.toml: scikit-learn, matplotlib
MAX_LEGEND_CLASSES = 20  # beyond that a legend hides the map; the title gives the number of classes


def require_embed_extras() -> None:
    """Stop with one line naming the extra when scikit-learn or matplotlib is missing, before any data
    or model is loaded."""
    for module, package in (("sklearn", "scikit-learn"), ("matplotlib", "matplotlib")):
        try:
            importlib.import_module(module)
        except ImportError as e:
            reason = (str(e).splitlines() or [""])[0]
            raise ConfigError(f"eval=embed needs {package} ({reason}); pip install -e \".[{EXTRA}]\" "
                              f"(scikit-learn, matplotlib)") from None


def check_embed_settings(eval_cfg: Mapping) -> None:
    """The extras installed and ``eval.max_points`` / ``perplexity`` / ``pca_dim`` in range."""
    for key, least in (("max_points", 2), ("pca_dim", 1)):  # a map of one point was refused after the features
        value = eval_cfg.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ConfigError(f"eval.{key} must be a whole number of at least {least}, not {value!r}")
    perplexity = eval_cfg.get("perplexity")
    if isinstance(perplexity, bool) or not isinstance(perplexity, int | float) or not perplexity > 0:
        raise ConfigError(f"eval.perplexity must be a positive number, not {perplexity!r}")
    require_embed_extras()


def map_columns(taps: Sequence[str], dims: Mapping[str, int], repr_name: str) -> dict[str, tuple[int, int]]:
    """The maps to draw, each as a ``[start, stop)`` column range of the concatenated features:
    each tap alone, and the whole representation too when it has several parts."""
    columns, start = {}, 0
    for tap in taps:
        columns[tap] = (start, start + dims[tap])
        start += dims[tap]
    if len(taps) > 1:
        columns[repr_name if repr_name == COMBINED else "+".join(taps)] = (0, start)
    return columns


def map_points(n: int, max_points: int, seed: int) -> torch.Tensor:
    """At most ``max_points`` of ``n`` indices, drawn with ``seed``, in random order (so no class is
    always drawn on top of the others)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_points]


def tsne_map(features: torch.Tensor, seed: int, perplexity: float, pca_dim: int) -> tuple[torch.Tensor, float]:
    """2-D t-SNE coordinates of ``features`` (M, D), and the perplexity used (at most (M - 1) / 3,
    as t-SNE needs more points than neighbours). t-SNE runs on one thread: its OpenMP threads wait for
    each other at each of its 1000 steps, which made it 5 to 25 times slower on a busy 2-core machine
    (measured), while one thread maps 5000 points in about a minute even there."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    n = features.shape[0]
    if n < 2:
        raise DataError(f"a t-SNE map needs at least 2 test images, not {n}")
    x = features.double()
    x = ((x - x.mean(0)) / x.std(0, unbiased=False).clamp_min(1e-12)).numpy()
    used = max(1.0, min(float(perplexity), (n - 1) / 3))
    if pca_dim < min(x.shape):
        x = PCA(n_components=pca_dim, random_state=seed).fit_transform(x)
    with threadpool_limits(limits=1, user_api="openmp"):
        coords = TSNE(n_components=2, perplexity=used, init="pca", random_state=seed).fit_transform(x)
    return torch.from_numpy(coords).float(), used


def class_colors(num_classes: int) -> list:
    """Distinct colours: tab10 / tab20 while they last, then evenly spaced hues."""
    from matplotlib import colormaps

    if num_classes <= 20:
        return list(colormaps["tab10" if num_classes <= 10 else "tab20"].colors)[:num_classes]
    hues = colormaps["turbo"]
    return [hues(k / max(1, num_classes - 1)) for k in range(num_classes)]


def draw_map(coords: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str], title: str, path: Path) -> None:
    """The map as a PNG: one dot per image coloured by its class, a legend with the class names and
    counts (up to :data:`MAX_LEGEND_CLASSES` classes), no axis ticks (t-SNE coordinates have no unit).
    Class names (an image folder's) and the title are drawn as written, never as mathtext or LaTeX; the
    PNG replaces a link at ``path``, never writes through it."""
    from matplotlib.lines import Line2D

    plt = pyplot()
    colors = class_colors(len(class_names))
    size = max(3.0, min(30.0, 20000.0 / max(1, len(labels))))
    with literal_text():
        fig, ax = plt.subplots(figsize=(8.5, 6.5))
        try:
            ax.scatter(coords[:, 0].numpy(), coords[:, 1].numpy(), s=size, c=[colors[k] for k in labels.tolist()],
                       alpha=0.75, linewidths=0)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel("t-SNE keeps neighbours, not distances or cluster sizes", fontsize=8, color="0.4")
            ax.set_title(title, fontsize=10, loc="left")
            if len(class_names) <= MAX_LEGEND_CLASSES:
                counts = torch.bincount(labels, minlength=len(class_names)).tolist()
                handles = [Line2D([], [], marker="o", linestyle="", color=colors[k], markersize=7,
                                  label=f"{name} ({counts[k]})") for k, name in enumerate(class_names)]
                ax.legend(handles=handles, title="class (points)", loc="upper left", bbox_to_anchor=(1.01, 1.0),
                          frameon=False, fontsize=9)
            save_png(fig, path, dpi=120, bbox_inches="tight")
        finally:
            plt.close(fig)


def features_of_test_set(encoder, taps: Sequence[str], test: ImageTensors, cfg: Mapping, device) -> torch.Tensor:
    """The test-set features as the kNN and cached linear protocols extract them, as float32 on the CPU."""
    dtype = autocast_dtype(cfg["trainer"].get("precision", "32-true"))
    features = extract_features(encoder.to(device), test, taps, cfg["data"]["mean"], cfg["data"]["std"],
                                cfg.get("feature_batch_size", 512), dtype, device)
    features = features.float().cpu()
    if not bool(torch.isfinite(features).all()):
        raise DataError("the encoder's test-set features are not finite (did pretraining diverge?); "
                        "nothing to map")
    return features


def embed_test_set(encoder, taps: Sequence[str], test: ImageTensors, num_classes: int, cfg: Mapping, device,
                   out_dir: Path, label: str, described: str) -> dict:
    """Write ``embeddings.pt`` and one ``tsne_<part>.png`` per :func:`map_columns` into ``out_dir``;
    the ``results.json`` fields that name them (no accuracy: ``val_acc`` and ``test_acc`` stay null)."""
    eval_cfg, seed, repr_name = cfg["eval"], int(cfg["seed"]), cfg["repr"]["name"]
    start = time.perf_counter()
    features = features_of_test_set(encoder, taps, test, cfg, device)
    labels = test.labels.cpu().long()
    names = list(test.classes) or [f"class {k}" for k in range(num_classes)]
    columns = map_columns(taps, encoder.dims, repr_name)
    points = map_points(len(labels), int(eval_cfg["max_points"]), seed)
    print(f"[eval] {label}: {features.shape[0]} test images, {features.shape[1]}-d; t-SNE of {len(points)} of "
          f"them (seed {seed}) for {len(columns)} map(s): {', '.join(columns)}", flush=True)
    maps = {}
    for part, (lo, hi) in columns.items():
        tic = time.perf_counter()
        coords, perplexity = tsne_map(features[points, lo:hi], seed, eval_cfg["perplexity"], eval_cfg["pca_dim"])
        file = f"tsne_{part}.png"
        what = f"repr={repr_name}" if part == repr_name else f"the {part} part of repr={repr_name}"
        title = (f"{label}: t-SNE of {what} ({hi - lo}-d)\n{described}\n"
                 f"{len(points)} of {len(labels)} test images (seed {seed}), perplexity {perplexity:g}")
        draw_map(coords, labels[points], names, title, out_dir / file)
        maps[part] = {"file": file, "columns": [lo, hi], "coords": coords, "perplexity": perplexity}
        print(f"[eval] map {part} ({hi - lo}-d): {time.perf_counter() - tic:.1f} s -> {out_dir / file}", flush=True)
    atomic_torch_save({"format": EMBEDDINGS_FORMAT, "features": features, "labels": labels, "class_names": names,
                       "repr": repr_name, "taps": list(taps), "model": label, "map_indices": points, "maps": maps},
                      out_dir / EMBEDDINGS_FILE)
    return {"embeddings": EMBEDDINGS_FILE, "maps": {part: m["file"] for part, m in maps.items()},
            "map_points": len(points), "embed_seconds": round(time.perf_counter() - start, 2)}
