//! The message as filters see and edit it: a header section split into fields, and the
//! body proper as the original `Bytes` slices (never copied unless a filter replaces it).
//!
//! Edits follow libmilter's documented semantics: `smfi_addheader` appends,
//! `smfi_insheader(idx)` inserts before the idx-th field of the whole header (0: top;
//! past the end: appended), `smfi_chgheader(name, idx)` changes the idx-th (1-based)
//! field of that name, an empty value deleting it and an index past the last one adding
//! it, `smfi_replacebody` replaces the whole body with the concatenated chunks.
//!
//! Must never: let a filter's header text end the header section or start a new field
//! (every line break in a value becomes CRLF followed by whitespace; NUL and lone CR are
//! dropped), or leave a bare LF in a replaced body (it is normalised to CRLF: the
//! smuggling defence holds for filtered mail too).

use bytes::{BufMut, Bytes, BytesMut};

/// One header field, as it will be written: "Name: value\r\n" with any folded lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    raw: Bytes,
}

impl Field {
    /// The field name (without the colon).
    pub fn name(&self) -> &[u8] {
        match memchr::memchr(b':', &self.raw) {
            Some(i) => trim_end_wsp(&self.raw[..i]),
            None => &[],
        }
    }

    /// The value after the colon without leading whitespace and without the final CRLF
    /// (folded lines keep their CRLF and leading whitespace).
    pub fn value(&self) -> &[u8] {
        let Some(i) = memchr::memchr(b':', &self.raw) else {
            return &[];
        };
        let mut v = &self.raw[i + 1..];
        while let [b' ' | b'\t', rest @ ..] = v {
            v = rest;
        }
        v.strip_suffix(b"\r\n").unwrap_or(v)
    }

    /// The field's bytes.
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    /// A field made from a filter's name and value, made safe (see the module docs).
    pub fn new(name: &str, value: &str) -> Field {
        let mut b = BytesMut::with_capacity(name.len() + value.len() + 4);
        b.put_slice(name.as_bytes());
        b.put_u8(b':');
        let v = value.as_bytes();
        if !matches!(v.first(), Some(b' ' | b'\t')) {
            b.put_u8(b' ');
        }
        let mut line_start = false;
        for &c in v {
            match c {
                // An empty line would end the header section: line breaks collapse.
                b'\n' if line_start => {}
                b'\n' => {
                    b.put_slice(b"\r\n");
                    line_start = true;
                }
                b'\r' | 0 => {}
                _ => {
                    if line_start && c != b' ' && c != b'\t' {
                        // A line that would start a new field: fold it instead.
                        b.put_u8(b'\t');
                    }
                    line_start = false;
                    b.put_u8(c);
                }
            }
        }
        // A value ending in a line break would leave an empty folded line.
        while b.ends_with(b"\r\n") {
            b.truncate(b.len() - 2);
        }
        b.put_slice(b"\r\n");
        Field { raw: b.freeze() }
    }
}

fn trim_end_wsp(mut s: &[u8]) -> &[u8] {
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// A message split for filtering.
#[derive(Debug, Clone)]
pub struct Message {
    fields: Vec<Field>,
    /// The empty line between header and body was there.
    blank: bool,
    /// The body proper (after the empty line), as the original slices.
    body: Vec<Bytes>,
    /// Something was edited (the header is rebuilt only then).
    edited: bool,
    /// The original slices (returned as they were when nothing was edited).
    original: Vec<Bytes>,
}

impl Message {
    /// Splits `slices` (header section, empty line, body) into fields and body slices.
    /// Copies only a header section that spans several slices.
    pub fn parse(slices: Vec<Bytes>) -> Message {
        let total: usize = slices.iter().map(Bytes::len).sum();
        // Find the end of the header section: the first CRLFCRLF (or a leading CRLF).
        let first = slices.first().cloned().unwrap_or_default();
        let (header, hdr_end, blank) = if first.starts_with(b"\r\n") {
            (Bytes::new(), 0, true)
        } else if let Some(i) = memchr::memmem::find(&first, b"\r\n\r\n") {
            (first.slice(..i + 2), i + 2, true)
        } else {
            // Spans slices: copy until the separator is found.
            let mut h = BytesMut::new();
            let mut found = None;
            for s in &slices {
                let from = h.len().saturating_sub(3);
                h.extend_from_slice(s);
                if let Some(i) = memchr::memmem::find(&h[from..], b"\r\n\r\n") {
                    found = Some(from + i + 2);
                    break;
                }
            }
            match found {
                Some(end) => {
                    h.truncate(end);
                    (h.freeze(), end, true)
                }
                None => (h.freeze(), total, false),
            }
        };
        let mut fields: Vec<Field> = Vec::new();
        let mut start = 0;
        let mut i = 0;
        while i < header.len() {
            let Some(nl) = memchr::memchr(b'\n', &header[i..]) else {
                break;
            };
            let end = i + nl + 1;
            let next_cont = matches!(header.get(end), Some(b' ' | b'\t'));
            if !next_cont {
                fields.push(Field {
                    raw: header.slice(start..end),
                });
                start = end;
            }
            i = end;
        }
        if start < header.len() {
            // A last line without CRLF (a message with no body and no final CRLF).
            let mut b = BytesMut::from(&header[start..]);
            b.put_slice(b"\r\n");
            fields.push(Field { raw: b.freeze() });
        }
        let skip = if blank { hdr_end + 2 } else { total };
        let body = skip_bytes(&slices, skip);
        Message {
            fields,
            blank,
            body,
            edited: false,
            original: slices,
        }
    }

    pub fn fields(&self) -> &[Field] {
        &self.fields
    }

    /// The body proper (after the empty line).
    pub fn body(&self) -> &[Bytes] {
        &self.body
    }

    /// `smfi_addheader`.
    pub fn add_header(&mut self, name: &str, value: &str) {
        self.fields.push(Field::new(name, value));
        self.edited = true;
    }

    /// `smfi_insheader`: before the `index`-th field (0: first).
    pub fn insert_header(&mut self, index: u32, name: &str, value: &str) {
        let at = (index as usize).min(self.fields.len());
        self.fields.insert(at, Field::new(name, value));
        self.edited = true;
    }

    /// `smfi_chgheader`: the `index`-th (1-based; 0 is taken as 1, as sendmail does)
    /// field named `name`; an empty value deletes it; past the last one, it is added.
    pub fn change_header(&mut self, index: u32, name: &str, value: &str) {
        let want = index.max(1) as usize;
        let pos = self
            .fields
            .iter()
            .enumerate()
            .filter(|(_, f)| f.name().eq_ignore_ascii_case(name.as_bytes()))
            .nth(want - 1)
            .map(|(i, _)| i);
        match (pos, value.is_empty()) {
            (Some(i), true) => {
                self.fields.remove(i);
            }
            (Some(i), false) => self.fields[i] = Field::new(name, value),
            (None, true) => return,
            (None, false) => self.fields.push(Field::new(name, value)),
        }
        self.edited = true;
    }

    /// `smfi_replacebody`: the concatenated chunks, line ends normalised to CRLF.
    pub fn replace_body(&mut self, chunks: &[Bytes]) {
        let mut b = BytesMut::with_capacity(chunks.iter().map(Bytes::len).sum::<usize>() + 16);
        let mut prev_cr = false;
        for c in chunks {
            for &x in c.iter() {
                match x {
                    b'\n' if !prev_cr => b.put_slice(b"\r\n"),
                    b'\n' => b.put_u8(b'\n'),
                    _ => {
                        if prev_cr {
                            // A lone CR: make it a line end.
                            b.put_u8(b'\n');
                        }
                        if x != b'\r' {
                            b.put_u8(x);
                        } else {
                            b.put_u8(b'\r');
                        }
                    }
                }
                prev_cr = x == b'\r';
            }
        }
        if prev_cr {
            b.put_u8(b'\n');
        }
        self.body = vec![b.freeze()];
        self.blank = true;
        self.edited = true;
    }

    /// Was anything edited?
    pub fn edited(&self) -> bool {
        self.edited
    }

    /// The message as slices again: the original ones if nothing was edited; else the
    /// rebuilt header (one slice), the empty line and the body slices.
    pub fn into_slices(self) -> Vec<Bytes> {
        if !self.edited {
            return self.original;
        }
        let mut h =
            BytesMut::with_capacity(self.fields.iter().map(|f| f.raw.len()).sum::<usize>() + 2);
        for f in &self.fields {
            h.put_slice(&f.raw);
        }
        if self.blank || !self.body.is_empty() {
            h.put_slice(b"\r\n");
        }
        let mut out = Vec::with_capacity(self.body.len() + 1);
        out.push(h.freeze());
        out.extend(self.body);
        out
    }
}

/// The slices after the first `n` bytes (zero-copy: the cut slice is a sub-slice).
fn skip_bytes(slices: &[Bytes], mut n: usize) -> Vec<Bytes> {
    let mut out = Vec::new();
    for s in slices {
        if n >= s.len() {
            n -= s.len();
            continue;
        }
        out.push(if n > 0 { s.slice(n..) } else { s.clone() });
        n = 0;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join(v: &[Bytes]) -> Vec<u8> {
        v.iter().flat_map(|b| b.iter().copied()).collect()
    }

    fn msg(parts: &[&str]) -> Message {
        Message::parse(
            parts
                .iter()
                .map(|p| Bytes::copy_from_slice(p.as_bytes()))
                .collect(),
        )
    }

    #[test]
    fn split_across_slices_and_folded_fields() {
        let m = msg(&[
            "Subject: a\r\n  b\r\nFrom: x@y\r",
            "\n\r\nbody\r\n",
            "more\r\n",
        ]);
        assert_eq!(m.fields().len(), 2);
        assert_eq!(m.fields()[0].name(), b"Subject");
        assert_eq!(m.fields()[0].value(), b"a\r\n  b");
        assert_eq!(m.fields()[1].value(), b"x@y");
        assert_eq!(join(m.body()), b"body\r\nmore\r\n");
        // Untouched: the very same slices come back.
        let orig = m.original.clone();
        assert_eq!(m.into_slices(), orig);
    }

    #[test]
    fn edits_follow_libmilter() {
        let mut m = msg(&["A: 1\r\nB: 2\r\nA: 3\r\n\r\nbody\r\n"]);
        m.add_header("X-Added", "yes");
        m.insert_header(0, "X-Top", "t");
        m.change_header(2, "a", "three");
        m.change_header(1, "B", "");
        m.change_header(5, "C", "c");
        m.change_header(5, "D", ""); // nothing to delete
        let out = join(&m.into_slices());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "X-Top: t\r\nA: 1\r\na: three\r\nX-Added: yes\r\nC: c\r\n\r\nbody\r\n"
        );
    }

    #[test]
    fn filter_text_cannot_start_a_field() {
        let f = Field::new("X-Spam", "yes\nBcc: victim@example\r\n\r\nbody\0");
        assert_eq!(
            &f.raw()[..],
            b"X-Spam: yes\r\n\tBcc: victim@example\r\n\tbody\r\n"
        );
        let f = Field::new("X-Folded", "a\n\tb\n");
        assert_eq!(&f.raw()[..], b"X-Folded: a\r\n\tb\r\n");
    }

    #[test]
    fn replaced_body_is_crlf() {
        let mut m = msg(&["S: x\r\n\r\nold\r\n"]);
        m.replace_body(&[
            Bytes::from_static(b"new\nline\r"),
            Bytes::from_static(b"\nend\rx"),
        ]);
        assert_eq!(
            join(&m.into_slices()),
            b"S: x\r\n\r\nnew\r\nline\r\nend\r\nx"
        );
    }

    #[test]
    fn no_header_and_no_body() {
        let m = msg(&["\r\njust body\r\n"]);
        assert!(m.fields().is_empty());
        assert_eq!(join(m.body()), b"just body\r\n");
        let mut m = msg(&["Subject: only\r\n"]);
        assert_eq!(m.fields().len(), 1);
        assert!(m.body().is_empty());
        m.add_header("X", "1");
        assert_eq!(join(&m.into_slices()), b"Subject: only\r\nX: 1\r\n");
    }
}

#[cfg(test)]
mod prop {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever value a filter sends, the field is one header field: CRLF line ends
        /// only, every further line folded, no empty line.
        #[test]
        fn a_field_stays_one_field(value in "[ -~\t\r\n\0]{0,80}") {
            let f = Field::new("X-Test", &value);
            let raw = f.raw();
            prop_assert!(raw.ends_with(b"\r\n"));
            let text = std::str::from_utf8(raw).unwrap();
            let body = &text[..text.len() - 2];
            for (i, line) in body.split("\r\n").enumerate() {
                prop_assert!(!line.contains('\r') && !line.contains('\n') && !line.contains('\0'));
                if i > 0 {
                    prop_assert!(line.starts_with([' ', '\t']), "{:?}", text);
                }
            }
        }
    }
}
