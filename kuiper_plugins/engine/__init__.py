"""What the eKuiper engine sees and checks: its key-value store (kv), the gob values kept in it (gob),
and the names it builds in (builtins)."""
