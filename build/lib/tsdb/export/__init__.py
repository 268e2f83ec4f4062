"""ONNX export of trained models for the torch-free streaming runtime (``tsdb_streaming``)."""
