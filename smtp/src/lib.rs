//! tern-smtp: the protocol core (sans-I/O).
//!
//! - [`proxy`]: PROXY protocol v1/v2 header parser (what a load balancer sends before SMTP/TLS).
#![forbid(unsafe_code)]

pub mod proxy;
