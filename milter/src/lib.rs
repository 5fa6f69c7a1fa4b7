//! tern-milter: the MTA side of the milter protocol, version 6 (sendmail 8.14+, Postfix
//! `milter_protocol = 6`), without I/O.
//!
//! Owns: the packet format (`codec`: 4-byte length, command byte, data), what tern offers
//! and what a filter may ask for in option negotiation (`Negotiated`: which stages are
//! sent at all, which expect no reply, which message edits the filter may make), the
//! validation of every filter response (`Response::decode`), the reply a filter's
//! `SMFIR_REPLYCODE` turns into (`FilterReply`: code class checked, CR/LF never passed
//! through), and the message edits of end-of-message (`edit`: header add/insert/change/
//! delete, body replacement, recipients, sender) applied to a message held as `Bytes`
//! slices (the body after the header section is never copied).
//!
//! How a conversation goes (the driver in the engine does the I/O):
//! OPTNEG → [MACRO C] CONNECT → [MACRO H] HELO → [MACRO M] MAIL → ([MACRO R] RCPT)* →
//! [MACRO T] DATA → HEADER* → [MACRO N] EOH → BODY* → [MACRO E] BODYEOB, then the edits
//! and the final verdict; ABORT/QUIT_NC to reuse the connection, QUIT to close it. Each
//! stage the filter declined in negotiation (`SMFIP_NO*`) is not sent; one it answers
//! with no reply (`SMFIP_NR_*`) is sent without waiting.
//!
//! Must never: do I/O, read a clock, panic on any byte a filter sends, or let a filter's
//! text become an SMTP reply or a header line that breaks the protocol (CR/LF, NUL).

#![forbid(unsafe_code)]

pub mod codec;
pub mod edit;

pub use codec::{
    DecodeError, FilterReply, Negotiated, Response, Stage, MAX_BODY_CHUNK, MAX_PACKET, VERSION,
};
