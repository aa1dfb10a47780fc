"""The SQL store through SQLAlchemy Core, on SQLite and PostgreSQL alike: the general
path of every repository."""
