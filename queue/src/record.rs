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
//!  4  u16 kind (1 = message)   12  u32 CRC32C(envelope)    24  u32 CRC32C(body)
//!  6  u16 flags (0)                                        28  u32 reserved (0)
//! 32  u64 reserved (0; room for state-change records: recipient index, status)
//! 40  u32 header CRC32C = crc32c(salt_le ++ offset_le ++ bytes 0..40)
//! 44  u32 reserved (0)
//! 48  envelope: rkyv archive, root at its end; padded with zeros to 8 bytes
//!     body: the message bytes as received; padded with zeros to 8 bytes
//! ```
//! All integers are little-endian. All lengths are checked against the segment before
//! use. The header CRC covers the record's own offset, so even a copy of a genuine header
//! is valid only where it was first written.

use rkyv::rancor::BoxedError;
use rkyv::util::AlignedVec;

use crate::envelope::{ArchivedEnvelope, Envelope};

pub const SEGMENT_MAGIC: [u8; 8] = *b"TERNSEG\0";
pub const FORMAT_VERSION: u32 = 1;
pub const SEGMENT_HEADER_SIZE: u64 = 4096;
/// Records start on this boundary: rkyv needs 8-byte alignment for the archive and it
/// keeps resynchronisation cheap (one candidate every 8 bytes).
pub const RECORD_ALIGN: u64 = 8;
pub const RECORD_MAGIC: [u8; 4] = *b"TRC1";
pub const RECORD_HEADER_SIZE: usize = 48;
pub const KIND_MESSAGE: u16 = 1;

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
        if kind != KIND_MESSAGE
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

/// Serialises an envelope with rkyv.
pub fn serialize_envelope(env: &Envelope) -> Result<AlignedVec, String> {
    rkyv::to_bytes::<BoxedError>(env).map_err(|e| format!("rkyv serialisation failed: {e}"))
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
    fn garbage_envelope_is_an_error() {
        assert!(deserialize_envelope(&[]).is_err());
        assert!(deserialize_envelope(&[0xff; 64]).is_err());
    }
}
