//! The `tern` command line, beside the server library: each subcommand in a module of its
//! own. These modules use the library (`tern_engine`); the library never uses them, which
//! the compiler enforces (they are part of the binary, not of the library).
//!
//! - `ctl`: `tern ctl` (status, reload, stop, log-level) over the admin socket.
//! - `queue`: `tern queue` (list, show, flush, delete, hold, release, stats), live over the
//!   admin socket or offline on the spool directory.
//! - `passwd`: `tern passwd` (the user store, like saslpasswd2/sasldblistusers2), and
//!   `sasldb`: reading a Cyrus sasldb2 for `tern passwd --import-sasldb`.
//! - `stdio`: `tern stdio` (sendmail -bs): one session on stdin/stdout.
//! - `sendmail`: `tern sendmail` (the sendmail command-line interface).
//! - `demo`: `tern demo` (a working relay on embedded defaults).
//! - `features`: `tern features` (what this build and configuration offer).
//! - `dkim`: `tern dkim keygen` (a DKIM key and its DNS record).

pub mod adopt;
pub mod ctl;
pub mod demo;
pub mod dkim;
pub mod features;
pub mod passwd;
pub mod queue;
pub mod sasldb;
pub mod sendmail;
pub mod stdio;
