"""The service's own SQLite store: connections, migrations, the registry."""
