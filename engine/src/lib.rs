//! tern-engine.
