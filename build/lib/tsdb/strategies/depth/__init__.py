"""The paper's split (``depth``: B noise bands) and its baseline arm (``e2e``: B = 1)."""
