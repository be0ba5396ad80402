"""What the eKuiper engine sees and checks: its key-value store (kv), the gob values kept in it (gob),
the names it builds in (builtins), and whether it would load a native plugin (compat)."""
