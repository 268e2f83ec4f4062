"""Recurrent depth (``looped``, ``looped-bptt``): one weight-tied core applied K times."""
