//! tern-queue: the spool.
