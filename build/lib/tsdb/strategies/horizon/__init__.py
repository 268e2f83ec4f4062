"""The staircase split (``horizon``): chunk j of the horizon sits in band j, block j owns it."""
