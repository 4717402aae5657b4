"""Raises while it is imported as __main__."""

raise ValueError("no config for this box")
