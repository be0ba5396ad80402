"""What the eKuiper engine sees: its key-value store (kv) and the gob values kept in it (gob)."""
