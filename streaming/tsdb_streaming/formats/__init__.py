"""One module per export format, each registering its forecaster class by format name
(``registry.register_format``): ``depth`` serves ``tsdb-streaming-onnx`` (depth, e2e and
looped exports), ``horizon`` serves ``tsdb-streaming-onnx-horizon``."""

from . import depth, horizon  # noqa: F401  (importing a format module registers it)
