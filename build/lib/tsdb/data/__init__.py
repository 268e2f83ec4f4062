"""The data layer: one internal representation, readers, validation and named datasets.

Names are imported on first use, so that the training loop (which needs only
``tsdb.data.series`` and ``tsdb.data.windows``) does not pull polars or gluonts in."""

from importlib import import_module

_EXPORTS = {
    "Series": "series", "SeriesDataset": "series",
    "from_gluonts": "readers", "read_exchange_rate": "readers", "read_long": "readers", "read_m4": "readers",
    "read_wide_csv": "readers",
    "describe": "registry", "list_datasets": "registry", "load_dataset": "registry", "ltsf_splits": "registry",
    "validate_dataset": "validate", "validate_series": "validate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"tsdb.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'tsdb.data' has no attribute {name!r}")
