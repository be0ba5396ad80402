"""Day-two work on an installed home: verify and repair, backup and restore."""
