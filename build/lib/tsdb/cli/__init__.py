"""The ``tsdb`` command line."""
