"""Integrations with other forecasting libraries, imported on demand so that tsdb does not
pull them in: ``tsdb.integrations.gluonts`` (``TsdbEstimator``) and
``tsdb.integrations.sktime`` (``TsdbForecaster``, needs ``pip install tsdb[sktime]``)."""
