//! A partial SASLprep (RFC 4013) without Unicode tables.
//!
//! Owns: preparing SCRAM user names and passwords (RFC 5802 §2.2 Normalize())
//! as far as is possible without a normalisation crate.
//!
//! Must never: accept a prohibited character (RFC 4013 §2.3) or silently
//! change an ASCII string (for printable ASCII, SASLprep is the identity).
//!
//! XXX not implemented, and why: NFKC (RFC 4013 §2.2), the unassigned-code
//! point check (RFC 3454 A.1) and the bidi rule (RFC 4013 §2.4) need Unicode
//! tables that would pull in a crate; non-ASCII strings are therefore used as
//! the client sends them after the mapping below. A client that sends a
//! different normalisation form than the one `tern passwd` stored fails to
//! authenticate (safe direction). ASCII passwords — nearly all in practice —
//! are fully handled.

use std::borrow::Cow;

/// A prohibited character was found (RFC 4013 §2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prohibited;

/// RFC 3454 C.1.2 non-ASCII space characters: mapped to U+0020 (RFC 4013 §2.1).
fn is_non_ascii_space(c: char) -> bool {
    matches!(
        c,
        '\u{00A0}' | '\u{1680}' | '\u{2000}'..='\u{200B}' | '\u{202F}' | '\u{205F}' | '\u{3000}'
    )
}

/// RFC 3454 B.1 "commonly mapped to nothing" (RFC 4013 §2.1).
fn is_mapped_to_nothing(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{034F}'
            | '\u{1806}'
            | '\u{180B}'..='\u{180D}'
            | '\u{200C}'..='\u{200D}'
            | '\u{2060}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FEFF}'
    )
}

/// RFC 4013 §2.3 prohibited output: C.2.1, C.2.2, C.3, C.4, C.5 (impossible
/// in `str`), C.6, C.7, C.8, C.9.
fn is_prohibited(c: char) -> bool {
    let u = c as u32;
    // C.2.1 ASCII control, C.2.2 non-ASCII control
    if u < 0x20 || u == 0x7f || (0x80..=0x9f).contains(&u) {
        return true;
    }
    // C.4 non-character code points: U+FDD0..FDEF and the last two of every plane
    if (0xFDD0..=0xFDEF).contains(&u) || (u & 0xFFFE) == 0xFFFE {
        return true;
    }
    matches!(
        u,
        // C.2.2
        0x06DD | 0x070F | 0x180E | 0x200C | 0x200D | 0x2028 | 0x2029
            | 0x2060..=0x2063 | 0x206A..=0x206F | 0xFEFF | 0xFFF9..=0xFFFC
            | 0x1D173..=0x1D17A
            // C.3 private use
            | 0xE000..=0xF8FF | 0xF0000..=0xFFFFD | 0x100000..=0x10FFFD
            // C.6 inappropriate for plain text
            | 0xFFFD
            // C.7 inappropriate for canonical representation
            | 0x2FF0..=0x2FFB
            // C.8 change display properties / deprecated
            | 0x0340 | 0x0341 | 0x200E | 0x200F | 0x202A..=0x202E
            // C.9 tagging characters
            | 0xE0001 | 0xE0020..=0xE007F
    )
}

/// Prepare `s`. Printable ASCII is returned unchanged without allocating.
pub fn saslprep(s: &str) -> Result<Cow<'_, str>, Prohibited> {
    if s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Ok(Cow::Borrowed(s));
    }
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if is_non_ascii_space(c) {
            out.push(' ');
        } else if is_mapped_to_nothing(c) {
            continue;
        } else if is_prohibited(c) {
            return Err(Prohibited);
        } else {
            out.push(c);
        }
    }
    Ok(Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ascii_is_identity() {
        assert!(matches!(saslprep("pencil"), Ok(Cow::Borrowed("pencil"))));
    }

    #[test]
    fn rfc4013_examples_we_can_do() {
        // RFC 4013 §3 examples 1, 2, 5 (3 and 4 need NFKC).
        assert_eq!(saslprep("I\u{00AD}X").as_deref(), Ok("IX"));
        assert_eq!(saslprep("user").as_deref(), Ok("user"));
        assert_eq!(saslprep("\u{0007}"), Err(Prohibited));
        assert_eq!(saslprep("a\u{00A0}b").as_deref(), Ok("a b"));
        assert_eq!(saslprep("a\u{E000}"), Err(Prohibited));
        assert_eq!(saslprep("caf\u{00E9}").as_deref(), Ok("caf\u{00E9}"));
    }
}
