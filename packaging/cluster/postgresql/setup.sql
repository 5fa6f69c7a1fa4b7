-- One-time setup of the users database (run as the postgres superuser:
-- `runuser -u postgres -- psql -f setup.sql`). e2e 24 runs this very file, with the
-- CHANGE-ME passwords replaced.
--
-- tern_admin creates the schema (`tern passwd --init`) and manages users with
-- `tern passwd -f postgresql://tern_admin:...@10.0.0.5/mail`; the nodes connect as
-- tern_node and only read.
CREATE ROLE tern_admin LOGIN PASSWORD 'admin-CHANGE-ME';
CREATE ROLE tern_node LOGIN PASSWORD 'node-CHANGE-ME';
CREATE DATABASE mail OWNER tern_admin;
-- After `tern passwd --init`, as tern_admin (it owns the tables):
--   GRANT SELECT ON tern_users, tern_sender_map TO tern_node;
-- (grants.sql)
