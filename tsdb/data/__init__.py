"""The data layer: one internal representation, readers, validation and named datasets.

Names are imported on first use, so that the training loop (which needs only
``tsdb.data.series`` and ``tsdb.data.windows``) does not pull polars or gluonts in."""

from tsdb.lazy import lazy_exports

_EXPORTS = {
    "Series": "series", "SeriesDataset": "series",
    "from_gluonts": "readers", "read_exchange_rate": "readers", "read_long": "readers", "read_m4": "readers",
    "read_wide_csv": "readers",
    "describe": "registry", "list_datasets": "registry", "load_dataset": "registry", "ltsf_splits": "registry",
    "validate_dataset": "validate", "validate_series": "validate",
}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
