-- Run as tern_admin after `tern passwd --init -f postgresql://tern_admin:...@10.0.0.5/mail`
-- (it owns the tables): the nodes read, never write. e2e 24 runs this very file.
GRANT SELECT ON tern_users, tern_sender_map TO tern_node;
