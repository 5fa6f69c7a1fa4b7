//! tern-engine.

pub mod sasl;
pub mod users;
