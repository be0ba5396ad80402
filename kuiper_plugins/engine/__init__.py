"""What the eKuiper engine sees and checks: its own store, its built-in names, its REST API."""
