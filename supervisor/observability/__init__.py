"""Observability: counters and histograms, /metrics, module logs, the audit log, systemd notification."""

# The supervisor's own log, in state_dir/logs beside the modules' (logs.py writes it, `cmactor
# logs --supervisor` reads it): here, so that the CLI need not import the writer to find it.
# No module's name: a module name starts with a letter.
SUPERVISOR_LOG = "_supervisor.log"
