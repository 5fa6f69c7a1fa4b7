//! The message envelope: what the session hands over with an accepted message, and what
//! the spool stores about it besides its body.
//!
//! Owns: the envelope's fields (the vocabulary of RFC 3461 DSN, RFC 2852 DELIVERBY, RFC
//! 6152/3030 body types) and, under the `rkyv` feature, their archived form. The session
//! builds it; `tern-queue` archives it. Changing a field here changes the spool's on-disk
//! format: bump `tern_queue::record::FORMAT_VERSION` and teach recovery to read the old
//! layout.
//! Must never: do I/O, or parse/validate SMTP syntax (the session did that before the
//! envelope was built; the spool stores what it is given).

/// RFC 3461 NOTIFY=NEVER.
pub const NOTIFY_NEVER: u8 = 1;
/// RFC 3461 NOTIFY=SUCCESS.
pub const NOTIFY_SUCCESS: u8 = 2;
/// RFC 3461 NOTIFY=FAILURE.
pub const NOTIFY_FAILURE: u8 = 4;
/// RFC 3461 NOTIFY=DELAY.
pub const NOTIFY_DELAY: u8 = 8;

/// One accepted message's envelope: everything but the body.
#[cfg_attr(
    feature = "rkyv",
    derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)
)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Queue id (assigned by the spool: `tern_queue::QueueIdGen`).
    pub id: String,
    /// MAIL FROM reverse-path; "" is the null reverse-path `<>`.
    pub sender: String,
    pub recipients: Vec<Recipient>,
    pub arrival_unix_micros: u64,
    /// Body length in bytes as stored, including the Received header the engine
    /// prepends. `ShardSpool::prepare` checks it against the body it is given.
    pub size: u64,
    pub body_type: BodyType,
    /// RFC 6531 SMTPUTF8 was given on MAIL FROM.
    pub smtputf8: bool,
    /// RFC 3461 RET.
    pub ret: Option<Ret>,
    /// RFC 3461 ENVID, xtext-decoded.
    pub envid: Option<String>,
    /// RFC 2852 BY.
    pub deliver_by: Option<DeliverBy>,
    /// Authenticated identity / MAIL AUTH= value (RFC 4954).
    pub auth: Option<String>,
    pub client_helo: String,
    /// "ip:port" of the client.
    pub client_addr: String,
}

/// One RCPT TO.
#[cfg_attr(
    feature = "rkyv",
    derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)
)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    pub addr: String,
    /// Bit set of `NOTIFY_*`; 0 = NOTIFY not given.
    pub notify: u8,
    /// RFC 3461 ORCPT, as given ("rfc822;addr" with xtext decoded).
    pub orcpt: Option<String>,
}

/// BODY= (RFC 6152 8BITMIME, RFC 3030 BINARYMIME).
#[cfg_attr(
    feature = "rkyv",
    derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)
)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyType {
    SevenBit,
    EightBitMime,
    BinaryMime,
}

/// RFC 3461 RET=.
#[cfg_attr(
    feature = "rkyv",
    derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)
)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ret {
    Full,
    Hdrs,
}

/// RFC 2852 `BY=<seconds>;<mode>[T]`.
#[cfg_attr(
    feature = "rkyv",
    derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)
)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliverBy {
    pub seconds: i64,
    pub mode: DeliverByMode,
    pub trace: bool,
}

/// RFC 2852 by-mode: R (return) or N (notify).
#[cfg_attr(
    feature = "rkyv",
    derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)
)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliverByMode {
    Return,
    Notify,
}
