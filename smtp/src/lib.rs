//! tern-smtp: the protocol core of tern, free of I/O.
//!
//! Everything here is a pure function of the bytes and the time it is given: no socket, no
//! file, no clock, no executor, no metrics, no `unsafe`. The server (`tern-engine`) drives
//! it from a glommio shard, `tern stdio` from standard input, the fuzz targets and the
//! benchmarks from memory; all of them see the same behaviour.
//!
//! A map of the crate, in the order a connection meets it:
//!
//! - [`session`]: the SMTP state machine (RFC 5321 + ESMTP): `Session::process` takes the
//!   bytes a client sent and appends replies; an [`session::Event`] tells the driver what
//!   to do next (read, store a message, start TLS, close). Inside: `command` (the command
//!   parser), `data` (the DATA/BDAT scanner over `Bytes` slices), `reply` (reply
//!   formatting).
//! - [`hooks`]: the one seam to the host: [`hooks::SessionHooks`] (AUTH blocks, refusals,
//!   AUTH results) and [`hooks::Now`] (the time the host read).
//! - [`proxy`]: the PROXY protocol v1/v2 header a load balancer sends before SMTP or TLS
//!   (parsed before the session exists; it only says who the client really is).
//! - [`policy`]: may this client relay to this domain?
//! - [`sasl`]: the AUTH mechanisms as sans-I/O exchanges, the nonce cache, the client side
//!   (for the load generator and tests).
//! - [`sender`]: which senders an authenticated login may use (`auth.sender_policy`).
//! - [`users`]: the user store's format and its immutable snapshot ([`users::UserDb`]);
//!   reading and writing the file is the engine's.
//! - [`envelope`]: what is stored about an accepted message besides its body (the spool's
//!   vocabulary: `tern-queue` archives it with rkyv under the `rkyv` feature).
//! - [`date`]: RFC 5322 dates for trace headers.
//!
//! Arrows point down only: nothing here names the engine, the queue or a runtime; the
//! compiler holds that, since this crate depends on neither.
#![forbid(unsafe_code)]

pub mod date;
pub mod envelope;
pub mod hooks;
pub mod policy;
pub mod proxy;
pub mod sasl;
pub mod sender;
pub mod session;
pub mod users;
