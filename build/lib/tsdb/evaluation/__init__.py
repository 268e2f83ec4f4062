"""Evaluation protocols (gluonts splits and metrics), baselines and plots."""
