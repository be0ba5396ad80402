"""Day-two work on an installed home, on top of install/: the audit trail, verify and repair, backup and restore."""
