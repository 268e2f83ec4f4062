"""KernelSynth: synthetic series drawn from Gaussian processes with random composite kernels.

The idea is the Chronos paper's (Ansari et al., 2024, section 4.2): draw 1..J kernels from a
fixed bank (periodic at seasons typical of hourly to yearly data, RBF, rational quadratic,
linear, white noise, constant), join them with random ``+`` and ``*``, and sample one path of
the GP prior on a regular grid. Time runs over ``t = i / length`` (i = 0..length-1), so a
periodic kernel of period ``p`` repeats every ``p`` steps and the RBF / rational-quadratic
length scales are fractions of the series.

Cost: a stationary composition is kept as one lag vector (O(L)) and expanded once into the
Toeplitz covariance; only the linear kernel needs the full ``L x L`` matrix. Sampling is one
Cholesky factorisation (O(L^3), about 15-25 ms at L = 1024 on one core) and one mat-vec.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import scipy.linalg

from tsdb.errors import TsdbError

KINDS = ("periodic", "rbf", "rational_quadratic", "linear", "white", "constant")


@dataclass(frozen=True)
class Kernel:
    """One kernel of the bank.

    ``param``: the period in steps (periodic), the length scale as a fraction of the series
    (rbf), alpha (rational_quadratic, length scale 1), the offset sigma_0 (linear:
    ``sigma_0^2 + t t'``), the variance (white) or the value (constant). ``freq`` names the
    sampling frequency whose season a periodic kernel models.
    """

    kind: str
    param: float = 1.0
    freq: str | None = None

    @property
    def stationary(self) -> bool:
        return self.kind != "linear"

    def of_lag(self, steps: np.ndarray, length: int) -> np.ndarray:
        """k at time distances of ``steps`` grid steps on a series of ``length`` points."""
        if self.kind == "periodic":
            return np.exp(-2.0 * np.sin(np.pi * steps / self.param) ** 2)
        d = steps / length
        if self.kind == "rbf":
            return np.exp(-0.5 * (d / self.param) ** 2)
        if self.kind == "rational_quadratic":
            return (1.0 + d ** 2 / (2.0 * self.param)) ** -self.param
        if self.kind == "white":
            return np.where(steps == 0, self.param, 0.0)
        if self.kind == "constant":
            return np.full(steps.shape, self.param)
        raise TsdbError(f"kernel {self.kind!r} is not stationary; use matrix()")

    def matrix(self, length: int) -> np.ndarray:
        """The full ``length x length`` covariance matrix."""
        if self.stationary:
            return scipy.linalg.toeplitz(self.of_lag(np.arange(length, dtype=np.float64), length))
        t = np.arange(length, dtype=np.float64) / length
        return self.param ** 2 + np.outer(t, t)

    def __str__(self) -> str:
        return f"{self.kind}({self.param:g})"


def _periodic(freq: str, *periods: int) -> list[Kernel]:
    return [Kernel("periodic", float(p), freq) for p in periods]


# Seasons of the usual sampling frequencies (in steps), then the non-periodic kernels.
DEFAULT_BANK: tuple[Kernel, ...] = tuple(
    _periodic("h", 24, 168) + _periodic("30min", 48, 336) + _periodic("15min", 96, 672)
    + _periodic("D", 7, 14, 30, 365) + _periodic("W", 4, 13, 26, 52) + _periodic("MS", 3, 6, 12)
    + _periodic("QS", 4) + _periodic("YS", 10)
    + [Kernel("rbf", s) for s in (0.1, 1.0, 10.0)]
    + [Kernel("rational_quadratic", a) for a in (0.1, 1.0, 10.0)]
    + [Kernel("linear", s) for s in (0.0, 1.0, 10.0)]
    + [Kernel("white", v) for v in (0.1, 1.0)]
    + [Kernel("constant", 1.0)]
)


@dataclass
class SynthSeries:
    """One KernelSynth draw with what is known of its seasonality."""

    values: np.ndarray          # float32 [length]
    expression: str             # the composite kernel, e.g. "(periodic(24) + rbf(0.1)) * linear(1)"
    periods: tuple[int, ...]    # periods (steps) of its periodic kernels, sorted
    freq: str | None = None     # frequency of the shortest period's kernel

    @property
    def season_length(self) -> int:
        return self.periods[0] if self.periods else 1


class KernelSynth:
    """Seeded KernelSynth draws of ``length`` points from compositions of 1..``max_kernels``
    kernels of ``bank``.

    ``sample(rng)`` is a pure function of the generator's state: the same seed gives the
    same series. A composition whose covariance stays numerically indefinite after the
    largest jitter is redrawn (as in the reference, which skips such draws).
    """

    JITTERS = (1e-6, 1e-5, 1e-4, 1e-3)  # relative to the mean variance

    def __init__(self, length: int = 1024, max_kernels: int = 5,
                 bank: tuple[Kernel, ...] = DEFAULT_BANK):
        if length < 2:
            raise TsdbError(f"KernelSynth length must be at least 2, got {length}")
        if max_kernels < 1:
            raise TsdbError(f"KernelSynth max_kernels must be at least 1, got {max_kernels}")
        unknown = [k.kind for k in bank if k.kind not in KINDS]
        if unknown or not bank:
            raise TsdbError(f"KernelSynth bank has unknown kernel kinds {unknown}; use {', '.join(KINDS)}")
        self.length, self.max_kernels, self.bank = length, max_kernels, bank
        self.steps = np.arange(length, dtype=np.float64)
        self.redraws = 0  # compositions skipped as numerically indefinite

    def compose(self, rng: np.random.Generator) -> tuple[list[Kernel], list[str]]:
        """Random kernels and the operators (``+`` / ``*``) that join them left to right."""
        n = int(rng.integers(1, self.max_kernels + 1))
        kernels = [self.bank[i] for i in rng.integers(0, len(self.bank), size=n)]
        ops = ["+" if b else "*" for b in rng.random(n - 1) < 0.5]
        return kernels, ops

    def covariance(self, kernels: list[Kernel], ops: list[str]) -> np.ndarray:
        """The composite covariance on the grid. Stationary parts stay lag vectors until a
        linear kernel (or the end) forces the Toeplitz expansion."""
        def value(k: Kernel):
            return k.of_lag(self.steps, self.length) if k.stationary else k.matrix(self.length)

        def join(a, b, op):
            if a.ndim != b.ndim:
                a, b = (scipy.linalg.toeplitz(x) if x.ndim == 1 else x for x in (a, b))
            return a + b if op == "+" else a * b

        joined = functools.reduce(lambda acc, pair: join(acc, value(pair[1]), pair[0]),
                                  zip(ops, kernels[1:]), value(kernels[0]))
        return scipy.linalg.toeplitz(joined) if joined.ndim == 1 else joined

    def draw(self, cov: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
        """One GP path with covariance ``cov`` (float64), or None if no jitter makes it
        positive definite."""
        z = rng.standard_normal(self.length)
        scale = float(np.mean(np.diag(cov)))
        if not np.isfinite(scale) or scale <= 0:
            return None
        eye = np.arange(self.length)
        for jitter in self.JITTERS:
            a = cov.copy()
            a[eye, eye] += jitter * scale
            try:
                chol = scipy.linalg.cholesky(a, lower=True, overwrite_a=True, check_finite=False)
            except np.linalg.LinAlgError:
                continue
            return chol @ z
        return None

    def sample(self, rng: np.random.Generator) -> SynthSeries:
        while True:
            kernels, ops = self.compose(rng)
            path = self.draw(self.covariance(kernels, ops), rng)
            values = None if path is None else path.astype(np.float32)
            if values is not None and np.all(np.isfinite(values)):
                break
            self.redraws += 1
        periodic = sorted((k for k in kernels if k.kind == "periodic"), key=lambda k: k.param)
        expression = str(kernels[0])
        for op, k in zip(ops, kernels[1:]):
            expression = f"({expression} {op} {k})"
        return SynthSeries(values, expression, tuple(sorted({int(k.param) for k in periodic})),
                           periodic[0].freq if periodic else None)
