"""The server's registry: SQLite (WAL) by default, written so PostgreSQL could replace it.

``db.Database`` owns the connection and the migration runner; ``base`` the transaction helpers
every owner shares. Each table belongs to one owner module, which holds every SQL statement on
it: ``catalog`` (models, versions, builds), ``devices`` (devices, groups, enrollment, presence),
``rollouts`` (artifacts, deployments and their builds and device rows), ``outbox`` (desired
states, commands, leases), ``observations`` (events, telemetry) and ``access`` (API tokens, the
audit chain). ``fleet.FleetRegistry`` combines the fleet owners and composes what spans them.
"""
