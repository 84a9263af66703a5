"""PostgreSQL implementations of the stores (chosen by ``KLEINSERVE_DATABASE_URL=postgresql://...``).

``database.py`` holds the connection pool and the start-up migration; the stores beside it mirror
the SQLite ones behind the same protocols, so callers never know which backend they hold.
"""
