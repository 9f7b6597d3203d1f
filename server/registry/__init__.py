"""The server's registry: SQLite (WAL) by default, written so PostgreSQL could replace it.

``db.Database`` owns the connection and the migration runner. Tables belong to owner
modules, each with its own ordered list of named migrations (``catalog`` for models,
versions and builds; ``fleet`` for devices, groups, deployments, events, telemetry, audit).
"""
