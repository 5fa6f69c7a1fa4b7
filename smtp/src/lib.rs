//! tern-smtp: the protocol core (sans-I/O).
#![forbid(unsafe_code)]
