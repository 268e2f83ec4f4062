"""Matplotlib figures: forecast fan charts and per-arm comparison bars."""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def fan_chart(panels: list[dict], path: str | Path, title: str = "", history_points: int = 192) -> Path:
    """One panel per series: history, median and 50%/80% bands of the sample paths.

    Each panel dict has ``item_id``, ``history`` ``[T]``, ``samples`` ``[S, H]`` and
    optionally ``truth`` ``[H]``.
    """
    n = len(panels)
    fig, axes = plt.subplots(n, 1, figsize=(10, 2.6 * n), squeeze=False)
    for ax, p in zip(axes[:, 0], panels):
        hist = np.asarray(p["history"])[-history_points:]
        t_hist = np.arange(-len(hist), 0)
        samples = np.asarray(p["samples"])
        t_fut = np.arange(samples.shape[1])
        q = np.nanquantile(samples, [0.1, 0.25, 0.5, 0.75, 0.9], axis=0)
        ax.plot(t_hist, hist, color="black", lw=1, label="history")
        ax.fill_between(t_fut, q[0], q[4], color="tab:blue", alpha=0.2, label="80% interval")
        ax.fill_between(t_fut, q[1], q[3], color="tab:blue", alpha=0.35, label="50% interval")
        ax.plot(t_fut, q[2], color="tab:blue", lw=1.5, label="median")
        if p.get("truth") is not None:
            ax.plot(t_fut, p["truth"], color="tab:red", lw=1, ls="--", label="actual")
        ax.set_title(str(p["item_id"]), fontsize=9, loc="left")
        ax.axvline(0, color="grey", lw=0.5)
    axes[0, 0].legend(loc="upper left", fontsize=7, ncol=5)
    axes[-1, 0].set_xlabel("steps relative to forecast start")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def bar_chart(values: dict[str, float], path: str | Path, ylabel: str, title: str = "",
              reference: float | None = None, reference_label: str = "",
              ranges: dict[str, tuple[float, float]] | None = None) -> Path:
    """Bars per arm; an optional horizontal reference line (e.g. the e2e arm) and optional
    whiskers per arm (``ranges``: e.g. min and max over seeds)."""
    names = list(values)
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(names) + 2), 3.5))
    ax.bar(names, [values[k] for k in names], color="tab:blue")
    if ranges:
        have = [k for k in names if k in ranges]
        lo = [values[k] - ranges[k][0] for k in have]
        hi = [ranges[k][1] - values[k] for k in have]
        ax.errorbar(have, [values[k] for k in have], yerr=[lo, hi], fmt="none", ecolor="black", capsize=3, lw=1)
    if reference is not None:
        ax.axhline(reference, color="tab:red", ls="--", lw=1, label=reference_label)
        ax.legend(fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    return _save(fig, path)


def line_chart(series: dict[str, tuple[list, list]], path: str | Path, xlabel: str, ylabel: str,
               title: str = "", logx: bool = False) -> Path:
    """One line per name: ``{name: (xs, ys)}``."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)



def line_panels(panels: list[tuple[str, dict[str, tuple[list, list]]]], path: str | Path, xlabel: str,
                title: str = "", styles: dict[str, dict] | None = None, logx: bool = False,
                logy: bool = False) -> Path:
    """Side-by-side line charts over one x axis: ``[(ylabel, {name: (xs, ys)}), ...]``;
    ``styles[name]`` holds extra ``plot`` keywords (color, linestyle, label)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ax, (ylabel, series) in zip(axes[0], panels):
        for name, (xs, ys) in series.items():
            ax.plot(xs, ys, **({"marker": "o", "ms": 3, "label": name} | (styles or {}).get(name, {})))
        if logx:
            ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    axes[0, 0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    with warnings.catch_warnings():   # ids in scripts the font lacks are drawn as boxes, not warned about
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
