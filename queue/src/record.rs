//! On-disk layout of segment headers and records, and nothing else.
//!
//! Owns: byte layouts, checksums, alignment, and (de)serialising the envelope with rkyv.
//! Must never: do I/O, panic on any input bytes, or accept a record header whose salted
//! checksum does not match (that check is what keeps a message body from being read as
//! a record).
//!
//! # Segment header (the first `SEGMENT_HEADER_SIZE` = 4096 bytes of every segment)
//! ```text
//!  0  [u8; 8] magic  "TERNSEG\0"
//!  8  u32     format version (1)
//! 12  u16     shard
//! 14  u16     record alignment (8)
//! 16  u64     segment number
//! 24  u64     creation time, unix micros
//! 32  u64     salt (random per segment; seeds every record header checksum)
//! 40  u64     segment size in bytes as created (the file never grows past it)
//! 48  u32     CRC32C of bytes 0..48
//! 52  ...     zero up to 4096
//! ```
//! # Record (starts at an 8-byte aligned offset ≥ 4096)
//! ```text
//!  0  u32 magic "TRC1"          8  u32 envelope length     16  u64 body length
//!  4  u16 kind (1 = message,  12  u32 CRC32C(envelope)    24  u32 CRC32C(body)
//!           2 = state change)
//!  6  u16 flags (0)                                        28  u32 reserved (0)
//! 32  u64 reserved (0; room for state-change records: recipient index, status)
//! 40  u32 header CRC32C = crc32c(salt_le ++ offset_le ++ bytes 0..40)
//! 44  u32 reserved (0)
//! 48  envelope: rkyv archive, root at its end; padded with zeros to 8 bytes
//!     body: the message bytes as received; padded with zeros to 8 bytes
//! ```
//! # State-change record (kind 2)
//! The same 48-byte header with `envelope length` = payload length, `CRC32C(envelope)` =
//! CRC32C(payload), body length 0 and body CRC 0; then the payload, zero-padded to 8.
//! The payload is a fixed little-endian layout (not rkyv: it is small, has no nesting,
//! and a hand layout keeps it ~70 bytes):
//! ```text
//!  0  u16 shard of the message     8  u64 message segment    24  u32 attempts
//!  2  u8  flags (1 warned, 2 held)  16  u64 message offset   28  u32 update count n
//!  3  u8  id length (≤ 23)                                   32  u64 next attempt (unix s)
//!  4  u16 reply length (≤ 512)
//!  6  u16 reserved (0)
//! 40  n × { u32 recipient index, u8 state (0 pending, 1 delivered, 2 failed), 3 × u8 0 }
//!  …  id bytes (UTF-8), then reply bytes (UTF-8); the payload ends exactly there
//! ```
//! All integers are little-endian. All lengths are checked against the segment before
//! use. The header CRC covers the record's own offset, so even a copy of a genuine header
//! is valid only where it was first written.

use rkyv::rancor::BoxedError;
use rkyv::util::AlignedVec;

use crate::envelope::{ArchivedEnvelope, Envelope};
use crate::state::{
    truncate_utf8, MsgId, MsgRef, RcptState, StateChange, MAX_ID_LEN, MAX_REPLY_LEN,
};

pub const SEGMENT_MAGIC: [u8; 8] = *b"TERNSEG\0";
pub const FORMAT_VERSION: u32 = 1;
pub const SEGMENT_HEADER_SIZE: u64 = 4096;
/// Records start on this boundary: rkyv needs 8-byte alignment for the archive and it
/// keeps resynchronisation cheap (one candidate every 8 bytes).
pub const RECORD_ALIGN: u64 = 8;
pub const RECORD_MAGIC: [u8; 4] = *b"TRC1";
pub const RECORD_HEADER_SIZE: usize = 48;
pub const KIND_MESSAGE: u16 = 1;
/// Per-recipient delivery state change; see the layout above and `state.rs`.
pub const KIND_STATE: u16 = 2;
/// Fixed part of a state payload.
pub const STATE_FIXED_LEN: usize = 40;

/// Rounds `n` up to a multiple of `align` (a power of two); `None` on overflow.
pub fn align_up(n: u64, align: u64) -> Option<u64> {
    Some(n.checked_add(align - 1)? & !(align - 1))
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(a)
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The decoded segment header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub shard: u16,
    pub number: u64,
    pub created_unix_micros: u64,
    pub salt: u64,
    pub size: u64,
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_SIZE as usize] {
        let mut b = [0u8; SEGMENT_HEADER_SIZE as usize];
        b[0..8].copy_from_slice(&SEGMENT_MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..14].copy_from_slice(&self.shard.to_le_bytes());
        b[14..16].copy_from_slice(&(RECORD_ALIGN as u16).to_le_bytes());
        b[16..24].copy_from_slice(&self.number.to_le_bytes());
        b[24..32].copy_from_slice(&self.created_unix_micros.to_le_bytes());
        b[32..40].copy_from_slice(&self.salt.to_le_bytes());
        b[40..48].copy_from_slice(&self.size.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..48]);
        b[48..52].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and validates; the error says what is wrong.
    pub fn decode(b: &[u8]) -> Result<SegmentHeader, String> {
        if b.len() < SEGMENT_HEADER_SIZE as usize {
            return Err(format!(
                "file is {} bytes, shorter than a segment header",
                b.len()
            ));
        }
        if b[0..8] != SEGMENT_MAGIC {
            return Err("bad segment magic".into());
        }
        if crc32c::crc32c(&b[0..48]) != u32_at(b, 48) {
            return Err("segment header checksum mismatch".into());
        }
        let version = u32_at(b, 8);
        if version != FORMAT_VERSION {
            return Err(format!("unsupported segment format version {version}"));
        }
        let align = u16_at(b, 14);
        if u64::from(align) != RECORD_ALIGN {
            return Err(format!("unsupported record alignment {align}"));
        }
        Ok(SegmentHeader {
            shard: u16_at(b, 12),
            number: u64_at(b, 16),
            created_unix_micros: u64_at(b, 24),
            salt: u64_at(b, 32),
            size: u64_at(b, 40),
        })
    }
}

/// A record header's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: u16,
    pub env_len: u32,
    pub env_crc: u32,
    pub body_len: u64,
    pub body_crc: u32,
}

impl RecordHeader {
    /// Bytes from the record's start to the end of its padded envelope.
    pub fn envelope_end(&self) -> u64 {
        RECORD_HEADER_SIZE as u64 + u64::from(self.env_len).div_ceil(RECORD_ALIGN) * RECORD_ALIGN
    }

    /// Total length of the record including padding; `None` if it overflows.
    pub fn total_len(&self) -> Option<u64> {
        align_up(
            self.envelope_end().checked_add(self.body_len)?,
            RECORD_ALIGN,
        )
    }

    /// Writes the header into `out[0..48]`, sealing it with the salted checksum.
    pub fn encode_into(&self, out: &mut [u8], salt: u64, offset: u64) {
        let h = &mut out[..RECORD_HEADER_SIZE];
        h.fill(0);
        h[0..4].copy_from_slice(&RECORD_MAGIC);
        h[4..6].copy_from_slice(&self.kind.to_le_bytes());
        h[8..12].copy_from_slice(&self.env_len.to_le_bytes());
        h[12..16].copy_from_slice(&self.env_crc.to_le_bytes());
        h[16..24].copy_from_slice(&self.body_len.to_le_bytes());
        h[24..28].copy_from_slice(&self.body_crc.to_le_bytes());
        let crc = header_crc(&h[0..40], salt, offset);
        h[40..44].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes the 48 bytes at a record position. `None` unless magic, kind, reserved
    /// fields and the salted checksum all match: a `None` is "no record starts here".
    pub fn decode(h: &[u8], salt: u64, offset: u64) -> Option<RecordHeader> {
        if h.len() < RECORD_HEADER_SIZE || h[0..4] != RECORD_MAGIC {
            return None;
        }
        if header_crc(&h[0..40], salt, offset) != u32_at(h, 40) {
            return None;
        }
        let kind = u16_at(h, 4);
        let kind_ok = match kind {
            KIND_MESSAGE => true,
            // A state record has no body.
            KIND_STATE => u64_at(h, 16) == 0 && u32_at(h, 24) == 0,
            _ => false,
        };
        if !kind_ok
            || u16_at(h, 6) != 0
            || u32_at(h, 28) != 0
            || u64_at(h, 32) != 0
            || u32_at(h, 44) != 0
        {
            return None;
        }
        Some(RecordHeader {
            kind,
            env_len: u32_at(h, 8),
            env_crc: u32_at(h, 12),
            body_len: u64_at(h, 16),
            body_crc: u32_at(h, 24),
        })
    }
}

/// The header checksum is seeded with the segment's random salt (and the record's
/// offset). A client controls message bodies; without the salt it cannot compute a
/// header that recovery would accept while resynchronising after a corrupted region.
pub fn header_crc(first40: &[u8], salt: u64, offset: u64) -> u32 {
    let mut seed = [0u8; 16];
    seed[0..8].copy_from_slice(&salt.to_le_bytes());
    seed[8..16].copy_from_slice(&offset.to_le_bytes());
    crc32c::crc32c_append(crc32c::crc32c(&seed), first40)
}

/// Encodes a state change's payload (layout above). The reply is cut to
/// `MAX_REPLY_LEN` bytes at a character boundary.
pub fn encode_state(c: &StateChange) -> Vec<u8> {
    let mut b = Vec::with_capacity(state_len(c));
    encode_state_into(c, &mut b);
    b
}

/// The length of `c`'s encoded payload.
pub fn state_len(c: &StateChange) -> usize {
    STATE_FIXED_LEN
        + 8 * c.updates.len()
        + c.id.as_str().len()
        + truncate_utf8(&c.last_reply, MAX_REPLY_LEN).len()
}

/// [`encode_state`], appended to `b` (the write path encodes after the record header, in
/// the buffer it writes from).
pub fn encode_state_into(c: &StateChange, b: &mut Vec<u8>) {
    let id = c.id.as_str().as_bytes();
    let reply = truncate_utf8(&c.last_reply, MAX_REPLY_LEN).as_bytes();
    let n = c.updates.len();
    b.extend_from_slice(&c.msg.shard.to_le_bytes());
    b.push(u8::from(c.warned) | (u8::from(c.held) << 1));
    b.push(id.len() as u8);
    b.extend_from_slice(&(reply.len() as u16).to_le_bytes());
    b.extend_from_slice(&0u16.to_le_bytes());
    b.extend_from_slice(&c.msg.segment.to_le_bytes());
    b.extend_from_slice(&c.msg.offset.to_le_bytes());
    b.extend_from_slice(&c.attempts.to_le_bytes());
    b.extend_from_slice(&(n as u32).to_le_bytes());
    b.extend_from_slice(&c.next_attempt_unix.to_le_bytes());
    for (i, s) in &c.updates {
        b.extend_from_slice(&i.to_le_bytes());
        b.extend_from_slice(&[s.code(), 0, 0, 0]);
    }
    b.extend_from_slice(id);
    b.extend_from_slice(reply);
}

/// Decodes and validates a state payload from untrusted bytes (its CRC was checked by
/// the caller). Any inconsistency is an error, never a panic.
pub fn decode_state(b: &[u8]) -> Result<StateChange, String> {
    if b.len() < STATE_FIXED_LEN {
        return Err(format!("state payload of {} bytes is too short", b.len()));
    }
    let shard = u16_at(b, 0);
    let flags = b[2];
    let id_len = b[3] as usize;
    let reply_len = u16_at(b, 4) as usize;
    if flags & !3 != 0 || u16_at(b, 6) != 0 {
        return Err("unknown flags or reserved bits in a state record".into());
    }
    if id_len > MAX_ID_LEN || reply_len > MAX_REPLY_LEN {
        return Err("id or reply too long in a state record".into());
    }
    let n = u32_at(b, 28) as usize;
    let updates_end = n
        .checked_mul(8)
        .and_then(|u| u.checked_add(STATE_FIXED_LEN))
        .ok_or("update count overflows")?;
    if updates_end.checked_add(id_len + reply_len) != Some(b.len()) {
        return Err(format!(
            "state payload is {} bytes, its fields say otherwise",
            b.len()
        ));
    }
    let mut updates = Vec::with_capacity(n);
    for k in 0..n {
        let at = STATE_FIXED_LEN + 8 * k;
        let state = RcptState::from_code(b[at + 4]).ok_or("unknown recipient state")?;
        if b[at + 5..at + 8] != [0, 0, 0] {
            return Err("reserved bytes set in a recipient update".into());
        }
        updates.push((u32_at(b, at), state));
    }
    let id = std::str::from_utf8(&b[updates_end..updates_end + id_len])
        .map_err(|_| "state record id is not UTF-8")?;
    let reply = std::str::from_utf8(&b[updates_end + id_len..])
        .map_err(|_| "state record reply is not UTF-8")?;
    Ok(StateChange {
        msg: MsgRef {
            shard,
            segment: u64_at(b, 8),
            offset: u64_at(b, 16),
        },
        id: MsgId::new(id).ok_or("id too long")?,
        updates,
        attempts: u32_at(b, 24),
        next_attempt_unix: u64_at(b, 32),
        last_reply: reply.to_string(),
        warned: flags & 1 != 0,
        held: flags & 2 != 0,
    })
}

/// Serialises an envelope with rkyv.
pub fn serialize_envelope(env: &Envelope) -> Result<AlignedVec, String> {
    rkyv::to_bytes::<BoxedError>(env).map_err(|e| format!("rkyv serialisation failed: {e}"))
}

/// Serialises an envelope with rkyv straight after the bytes already in `buf` (the record
/// header), so the write path builds a record in the one buffer it is written from.
///
/// The archive bytes are identical to [`serialize_envelope`]'s: rkyv pads for alignment
/// relative to the start of its writer, and `buf.len()` must be a multiple of 16 (the
/// largest alignment an archived envelope needs; checked), so every padding decision falls
/// the same way. Pointers in the archive are relative, so its position does not matter.
pub fn serialize_envelope_after(env: &Envelope, buf: Vec<u8>) -> Result<Vec<u8>, String> {
    if buf.len() % 16 != 0 {
        return Err(format!(
            "envelope would start at {}, not 16-byte aligned",
            buf.len()
        ));
    }
    rkyv::api::high::to_bytes_in::<_, BoxedError>(env, buf)
        .map_err(|e| format!("rkyv serialisation failed: {e}"))
}

/// A capacity that holds `env`'s archive without growing: the strings' bytes plus a
/// generous allowance for rkyv's fixed parts (its per-field and per-recipient overhead
/// is well under the allowances). A wrong guess costs a reallocation, never correctness.
pub fn envelope_capacity_hint(env: &Envelope) -> usize {
    let opt = |s: &Option<String>| s.as_ref().map_or(0, String::len);
    let strings = env.id.len()
        + env.sender.len()
        + opt(&env.envid)
        + opt(&env.auth)
        + env.client_helo.len()
        + env.client_addr.len();
    let rcpts: usize = env
        .recipients
        .iter()
        .map(|r| r.addr.len() + opt(&r.orcpt) + 48)
        .sum();
    256 + strings + rcpts
}

/// Validates (bytecheck) and deserialises an envelope from untrusted bytes.
/// The bytes are copied into an aligned buffer first, so the result never depends on
/// where the caller's slice happens to sit in memory.
pub fn deserialize_envelope(bytes: &[u8]) -> Result<Envelope, String> {
    let mut aligned: AlignedVec<16> = AlignedVec::with_capacity(bytes.len());
    aligned.extend_from_slice(bytes);
    let archived = rkyv::access::<ArchivedEnvelope, BoxedError>(&aligned)
        .map_err(|e| format!("envelope failed validation: {e}"))?;
    rkyv::deserialize::<Envelope, BoxedError>(archived)
        .map_err(|e| format!("envelope failed to deserialise: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_after_a_header_is_the_same_archive() {
        let env = Envelope {
            id: "0123456789ABCDEF".into(),
            sender: "a@example.org".into(),
            recipients: (0..5)
                .map(|i| crate::Recipient {
                    addr: format!("r{i}@example.net"),
                    notify: i,
                    orcpt: (i % 2 == 0).then(|| format!("rfc822;o{i}@example.net")),
                })
                .collect(),
            arrival_unix_micros: 7,
            size: 3,
            body_type: crate::BodyType::EightBitMime,
            smtputf8: true,
            ret: Some(crate::Ret::Hdrs),
            envid: Some("e".into()),
            deliver_by: Some(crate::DeliverBy {
                seconds: -5,
                mode: crate::DeliverByMode::Notify,
                trace: true,
            }),
            auth: None,
            client_helo: "h".into(),
            client_addr: "192.0.2.1:1".into(),
        };
        let alone = serialize_envelope(&env).unwrap();
        let mut head = Vec::with_capacity(RECORD_HEADER_SIZE + envelope_capacity_hint(&env));
        head.resize(RECORD_HEADER_SIZE, 0xAA);
        let cap = head.capacity();
        let after = serialize_envelope_after(&env, head).unwrap();
        assert_eq!(
            &after[..RECORD_HEADER_SIZE],
            &[0xAA; RECORD_HEADER_SIZE][..]
        );
        assert_eq!(&after[RECORD_HEADER_SIZE..], &alone[..]);
        assert_eq!(
            after.capacity(),
            cap,
            "the hint was too small: the buffer grew"
        );
        assert!(serialize_envelope_after(&env, vec![0; 8]).is_err());
    }

    #[test]
    fn header_round_trip_and_salt_matters() {
        let h = RecordHeader {
            kind: KIND_MESSAGE,
            env_len: 100,
            env_crc: 1,
            body_len: 5000,
            body_crc: 2,
        };
        let mut buf = [0u8; RECORD_HEADER_SIZE];
        h.encode_into(&mut buf, 42, 4096);
        assert_eq!(RecordHeader::decode(&buf, 42, 4096), Some(h));
        assert_eq!(
            RecordHeader::decode(&buf, 43, 4096),
            None,
            "wrong salt must not validate"
        );
        assert_eq!(
            RecordHeader::decode(&buf, 42, 4104),
            None,
            "wrong offset must not validate"
        );
        assert_eq!(h.total_len(), Some(48 + 104 + 5000));
    }

    #[test]
    fn segment_header_round_trip() {
        let s = SegmentHeader {
            shard: 3,
            number: 9,
            created_unix_micros: 77,
            salt: 0xdead,
            size: 1 << 20,
        };
        let b = s.encode();
        assert_eq!(SegmentHeader::decode(&b), Ok(s));
        let mut bad = b;
        bad[20] ^= 1;
        assert!(SegmentHeader::decode(&bad).is_err());
        assert!(SegmentHeader::decode(&b[..100]).is_err());
    }

    #[test]
    fn state_payload_round_trip_and_garbage() {
        let c = StateChange {
            msg: MsgRef {
                shard: 2,
                segment: 7,
                offset: 8192,
            },
            id: MsgId::new("0123456789ABCDEF").unwrap(),
            updates: vec![(0, RcptState::Delivered), (5, RcptState::Failed)],
            attempts: 3,
            next_attempt_unix: 1_800_000_000,
            last_reply: "451 4.7.1 try later".into(),
            warned: true,
            held: false,
        };
        let b = encode_state(&c);
        assert_eq!(b.len(), 40 + 16 + 16 + 19);
        assert_eq!(decode_state(&b), Ok(c.clone()));
        let long = StateChange {
            last_reply: "é".repeat(400),
            ..c.clone()
        };
        let d = decode_state(&encode_state(&long)).unwrap();
        assert_eq!(d.last_reply.len(), 512);
        for cut in 0..b.len() {
            assert!(decode_state(&b[..cut]).is_err());
        }
        let mut bad = b.clone();
        bad[44] = 9; // unknown state
        assert!(decode_state(&bad).is_err());
        for i in 0..b.len() {
            let mut x = b.clone();
            x[i] ^= 0xff;
            let _ = decode_state(&x); // never panics
        }
        let h = RecordHeader {
            kind: KIND_STATE,
            env_len: b.len() as u32,
            env_crc: crc32c::crc32c(&b),
            body_len: 0,
            body_crc: 0,
        };
        let mut buf = [0u8; RECORD_HEADER_SIZE];
        h.encode_into(&mut buf, 1, 4096);
        assert_eq!(RecordHeader::decode(&buf, 1, 4096), Some(h));
        let with_body = RecordHeader { body_len: 1, ..h };
        with_body.encode_into(&mut buf, 1, 4096);
        assert_eq!(RecordHeader::decode(&buf, 1, 4096), None);
    }

    #[test]
    fn garbage_envelope_is_an_error() {
        assert!(deserialize_envelope(&[]).is_err());
        assert!(deserialize_envelope(&[0xff; 64]).is_err());
    }
}
