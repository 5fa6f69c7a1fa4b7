//! The message envelope, as the spool stores it: the types live in the protocol core
//! (`tern_smtp::envelope`, which the session builds) and are archived here with rkyv
//! (the `rkyv` feature of tern-smtp). Changing a field changes the on-disk format: see
//! `record::FORMAT_VERSION`.

pub use tern_smtp::envelope::*;
