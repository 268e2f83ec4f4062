"""The data layer: one internal representation, readers, validation and named datasets."""

from tsdb.data.readers import from_gluonts, read_exchange_rate, read_long, read_m4, read_wide_csv
from tsdb.data.registry import describe, list_datasets, load_dataset, ltsf_splits
from tsdb.data.series import Series, SeriesDataset
from tsdb.data.validate import validate_dataset, validate_series

__all__ = [
    "Series",
    "SeriesDataset",
    "describe",
    "from_gluonts",
    "list_datasets",
    "load_dataset",
    "ltsf_splits",
    "read_exchange_rate",
    "read_long",
    "read_m4",
    "read_wide_csv",
    "validate_dataset",
    "validate_series",
]
