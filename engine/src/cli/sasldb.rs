//! Reading a Cyrus SASL sasldb2 for `tern passwd --import-sasldb`.
//!
//! Owns: running Berkeley DB's `db_dump -p FILE` (Debian package `db-util`) and parsing
//! its printable dump into sasldb entries. A sasldb2 is a Berkeley DB hash whose keys
//! are `user NUL realm NUL property` and whose values are the property's value; the
//! property tern can use is `userPassword` (the plaintext password, which Cyrus 2.1 and
//! later keep there); others (`cmusaslsecretOTP`, ...) are reported and skipped by the
//! caller.
//!
//! Why `db_dump` and not a Rust crate: no maintained crate reads Berkeley DB hash files
//! (the format has per-version page layouts, overflow pages and both byte orders);
//! `db_dump` is the format's own reader, matches the libdb that wrote the file, and its
//! `-p` output is a stable, documented text format.
//!
//! Must never: print or log a value (they are passwords): `db_dump`'s standard output
//! is only parsed, never echoed, values are zeroed when dropped, and error messages
//! name line numbers, not contents.

use std::io;
use std::path::Path;
use std::process::{Command, Stdio};

/// A byte buffer zeroed on drop (best effort: it holds passwords).
pub struct SecretBytes(pub Vec<u8>);

impl Drop for SecretBytes {
    fn drop(&mut self) {
        self.0.iter_mut().for_each(|b| *b = 0);
    }
}

impl std::fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBytes(..)")
    }
}

/// One sasldb record.
#[derive(Debug)]
pub struct Entry {
    pub user: Vec<u8>,
    pub realm: Vec<u8>,
    pub property: Vec<u8>,
    pub value: SecretBytes,
}

/// The `db_dump` programs tried, in order (Debian's `db-util` installs `db_dump`;
/// versioned names come with `db5.3-util`).
pub const DB_DUMP: [&str; 2] = ["db_dump", "db5.3_dump"];

/// Why a sasldb could not be read.
#[derive(Debug)]
pub enum DumpError {
    /// No `db_dump` on PATH.
    NoTool,
    /// `db_dump` could not be started.
    Spawn(io::Error),
    /// `db_dump` failed (its standard error, which holds no record contents).
    Failed(String),
    /// The dump does not parse (a line number, never contents).
    Format(String),
}

impl std::fmt::Display for DumpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DumpError::NoTool => write!(
                f,
                "db_dump not found on PATH: reading a sasldb2 needs Berkeley DB's db_dump \
                 (Debian/Ubuntu: apt-get install db-util)"
            ),
            DumpError::Spawn(e) => write!(f, "cannot run db_dump: {e}"),
            DumpError::Failed(msg) => write!(f, "db_dump failed: {msg}"),
            DumpError::Format(msg) => write!(f, "unexpected db_dump output: {msg}"),
        }
    }
}

fn find_tool() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    DB_DUMP.iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// Run `db_dump -p FILE` and parse its output.
pub fn read(file: &Path) -> Result<Vec<Entry>, DumpError> {
    let tool = find_tool().ok_or(DumpError::NoTool)?;
    let out = Command::new(tool)
        .arg("-p")
        .arg(file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(DumpError::Spawn)?;
    let stdout = SecretBytes(out.stdout);
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr);
        let msg: Vec<&str> = msg
            .lines()
            .filter(|l| !l.trim().is_empty())
            .take(3)
            .collect();
        return Err(DumpError::Failed(if msg.is_empty() {
            out.status.to_string()
        } else {
            msg.join("; ")
        }));
    }
    parse_dump(&stdout.0).map_err(DumpError::Format)
}

/// Parse `db_dump -p` output: header lines up to `HEADER=END`, then key and value
/// lines alternating, each starting with one space, up to `DATA=END`; a file with
/// several databases repeats header and data. In the printable format a byte is
/// itself when printable, `\\` for a backslash, and `\xx` (two hex digits) otherwise.
pub fn parse_dump(text: &[u8]) -> Result<Vec<Entry>, String> {
    let mut entries = Vec::new();
    let mut in_data = false;
    let mut key: Option<(usize, Vec<u8>)> = None;
    let mut saw_data = false;
    let text = text.strip_suffix(b"\n").unwrap_or(text);
    for (index, line) in text.split(|&b| b == b'\n').enumerate() {
        let line_no = index + 1;
        if !in_data {
            if line == b"HEADER=END" {
                in_data = true;
                saw_data = true;
            } else if line == b"format=bytevalue" {
                return Err(format!("line {line_no}: not the printable format (-p)"));
            }
            continue;
        }
        if line == b"DATA=END" {
            if let Some((n, _)) = key {
                return Err(format!("line {n}: key without a value"));
            }
            in_data = false;
            continue;
        }
        let Some(body) = line.strip_prefix(b" ") else {
            return Err(format!("line {line_no}: expected a record line"));
        };
        let bytes = unescape(body).map_err(|e| format!("line {line_no}: {e}"))?;
        match key.take() {
            None => key = Some((line_no, bytes)),
            Some((n, k)) => {
                let value = SecretBytes(bytes);
                let mut parts = k.splitn(3, |&b| b == 0);
                let (Some(user), Some(realm), Some(property)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    return Err(format!("line {n}: key is not user NUL realm NUL property"));
                };
                entries.push(Entry {
                    user: user.to_vec(),
                    realm: realm.to_vec(),
                    property: property.to_vec(),
                    value,
                });
            }
        }
    }
    if in_data {
        return Err("no DATA=END (truncated dump)".into());
    }
    if !saw_data {
        return Err("no HEADER=END (not a db_dump output)".into());
    }
    Ok(entries)
}

/// Undo db_dump's printable escaping.
fn unescape(s: &[u8]) -> Result<Vec<u8>, &'static str> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] != b'\\' {
            out.push(s[i]);
            i += 1;
            continue;
        }
        match s.get(i + 1) {
            Some(b'\\') => {
                out.push(b'\\');
                i += 2;
            }
            Some(_) => {
                let hex = s.get(i + 1..i + 3).ok_or("truncated \\xx escape")?;
                let hex = std::str::from_utf8(hex).map_err(|_| "bad \\xx escape")?;
                let byte = u8::from_str_radix(hex, 16).map_err(|_| "bad \\xx escape")?;
                out.push(byte);
                i += 3;
            }
            None => return Err("trailing backslash"),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Debian's db_dump 5.3 prints for a sasldb2 made by saslpasswd2.
    const DUMP: &str =
        "VERSION=3\nformat=print\ntype=hash\nh_nelem=3\ndb_pagesize=4096\nHEADER=END\n \
alice\\00example.org\\00userPassword\n pw1\n \
bob\\00mx.test\\00userPassword\n p w\\\\2\\c3\\a9\n \
bob\\00mx.test\\00cmusaslsecretOTP\n \\01\\02\nDATA=END\n";

    #[test]
    fn parses_a_real_dump() {
        let e = parse_dump(DUMP.as_bytes()).expect("parses");
        assert_eq!(e.len(), 3);
        assert_eq!(
            (&e[0].user[..], &e[0].realm[..], &e[0].property[..]),
            (&b"alice"[..], &b"example.org"[..], &b"userPassword"[..])
        );
        assert_eq!(e[0].value.0, b"pw1");
        assert_eq!(e[1].value.0, "p w\\2é".as_bytes());
        assert_eq!(e[2].property, b"cmusaslsecretOTP");
        assert_eq!(e[2].value.0, [1, 2]);
        // Debug never shows a value.
        assert!(!format!("{:?}", e[0]).contains("pw1"));
    }

    #[test]
    fn rejects_broken_dumps_without_echoing_contents() {
        for (bad, want) in [
            ("", "HEADER=END"),
            ("HEADER=END\n k\\00r\\00p\n", "DATA=END"),
            (
                "HEADER=END\n k\\00r\\00p\nDATA=END\n",
                "key without a value",
            ),
            (
                "HEADER=END\n k\\00r\n secretvalue\nDATA=END\n",
                "user NUL realm",
            ),
            ("HEADER=END\nsecretvalue\nDATA=END\n", "record line"),
            ("HEADER=END\n k\\0\nDATA=END\n", "escape"),
            ("HEADER=END\n k\\zz\nDATA=END\n", "escape"),
            ("format=bytevalue\nHEADER=END\nDATA=END\n", "printable"),
        ] {
            let err = parse_dump(bad.as_bytes()).expect_err(bad);
            assert!(err.contains(want), "{bad:?}: {err}");
            assert!(!err.contains("secretvalue"), "{err}");
        }
        // An empty database is fine.
        assert!(parse_dump(b"VERSION=3\nHEADER=END\nDATA=END\n")
            .expect("empty")
            .is_empty());
    }
}
