"""PostgreSQL access: connections, migrations, and the database → domain error seam."""
