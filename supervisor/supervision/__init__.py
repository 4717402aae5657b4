"""Supervision: module records and states, worker processes, bringing modules up, restarts, health."""
