"""Training with Lightning, one unit (block) at a time; memory measurement; block-parallel jobs."""
