"""Observability: counters and histograms, /metrics, module logs, the audit log, systemd notification."""
