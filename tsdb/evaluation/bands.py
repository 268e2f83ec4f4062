"""Per-block denoising error by noise level: a health check of a blocks model.

For windows cut from a protocol's training series, every block ``b`` denoises the
normalised future at each sigma of a grid: ``MSE_b(sigma) = mean (D_b(y + sigma eps, sigma |
x) - y)^2`` on the normalised scale. Two things to read in the table:

- the block that owns a band (``strategy.schedule``) should have the lowest error there; a
  neighbour doing better points at routing or at a block that did not train;
- at the highest sigmas ``D`` is the model's forecast of the mean future given the context:
  an error near ``E[y^2]`` (the error of predicting the context's mean) says the high-noise
  block ignores its context, so every sample starts from an unconditional guess.

``python -m tsdb.evaluation.bands MODEL --dataset m4_hourly`` prints the table for a run
directory or a pretrained checkpoint folder (``tsdb.training.loop.load_model``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from tsdb.errors import TsdbError

SIGMAS = (40.0, 10.0, 3.0, 1.0, 0.3, 0.1)


def series_windows(values: list[np.ndarray], context_length: int, horizon: int,
                   per_series: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``per_series`` windows ``(context [C], target [H])`` from the end of each series,
    ``horizon`` apart (series shorter than ``C + H`` are skipped)."""
    ctx, tgt = [], []
    for x in values:
        for k in range(per_series):
            end = len(x) - k * horizon
            if end - horizon - context_length < 0:
                break
            ctx.append(x[end - horizon - context_length:end - horizon])
            tgt.append(x[end - horizon:end])
    if not ctx:
        raise TsdbError(f"no series has the {context_length + horizon} points a window needs")
    return np.stack(ctx).astype(np.float32), np.stack(tgt).astype(np.float32)


@torch.no_grad()
def band_errors(model, context: np.ndarray, target: np.ndarray, sigmas=SIGMAS, seed: int = 0) -> dict:
    """Per block and sigma the normalised MSE of its denoiser, with ``E[y^2]`` (the error of
    the context mean) as the reference; the same noise for every block. Each block encodes
    the context once (``DiffusionForecaster.denoisers``, the sampler's D)."""
    features, y, observed, _, _ = model.prepare(torch.from_numpy(context), torch.from_numpy(target))
    eps = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
    n = observed.sum().clamp_min(1.0)
    mse = lambda d: float((((d - y) ** 2) * observed).sum() / n)  # noqa: E731  (missing values carry none)
    errors = [[mse(denoise(y + s * eps, torch.full((len(y),), float(s)))) for s in sigmas]
              for denoise in model.denoisers(model.encode(features))]
    return {"sigmas": list(sigmas), "errors": errors, "mean_square": mse(torch.zeros_like(y)), "windows": len(y)}


def owners(strategy, sigmas) -> list[int]:
    """The block whose band holds each sigma (block 0 owns the highest band)."""
    edges = strategy.edges().double()                     # ascending, B + 1 edges
    b = len(edges) - 1
    above = torch.searchsorted(edges, torch.tensor([float(s) for s in sigmas], dtype=torch.float64), right=True)
    return [min(max(b - int(k), 0), b - 1) for k in above]


def table(result: dict, owner: list[int]) -> str:
    b = len(result["errors"])
    lines = [f"{result['windows']} windows; E[y^2] = {result['mean_square']:.4f} (the error of the context mean)", "",
             "| sigma | owner | " + " | ".join(f"block {i}" for i in range(b)) + " | owner best |",
             "|---" * (b + 3) + "|"]
    for j, s in enumerate(result["sigmas"]):
        row = [result["errors"][i][j] for i in range(b)]
        best = int(np.argmin(row))
        lines.append(f"| {s:g} | {owner[j]} | " + " | ".join(f"{e:.4f}" for e in row)
                     + f" | {'yes' if best == owner[j] else f'no (block {best})'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from tsdb.bench.experiment import TaskSpec, build_task
    from tsdb.training.loop import load_model

    ap = argparse.ArgumentParser(prog="python -m tsdb.evaluation.bands", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="a run directory or a pretrained checkpoint folder")
    ap.add_argument("--dataset", default="m4_hourly", help="m4_hourly, etth1 or exchange_rate")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--per-series", type=int, default=4)
    args = ap.parse_args(argv)
    _, strategy, model = load_model(args.model)
    if not hasattr(strategy, "edges"):
        raise SystemExit(f"error: {args.model} is a {strategy.name} model; band errors need a depth or e2e model")
    protocol = {"m4_hourly": "m4-hourly", "etth1": "etth1"}.get(args.dataset, "rolling")
    task = build_task(TaskSpec(protocol=protocol, dataset=args.dataset), args.data_root)
    context, target = series_windows([s.target for s in task.train], model.context_length, model.horizon,
                                     args.per_series)
    model = model.float().eval()
    print(f"{args.model} on {args.dataset} (training series, the last {args.per_series} windows of each):")
    print(table(band_errors(model, context, target), owners(strategy, SIGMAS)))


if __name__ == "__main__":
    main()
