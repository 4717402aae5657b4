"""Persistence: the state directory, the journal of acknowledged changes, saves and the saved file."""
