"""What happens to plugins over time, on top of install/: the audit trail (and, in time, history and verify)."""
