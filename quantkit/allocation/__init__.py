"""Mixed-precision allocation: per-layer bit widths chosen under a budget counted from the bytes written."""
