//! RFC 5322 §3.3 date-time for trace headers, written straight into a buffer.
//!
//! Owns: turning Unix seconds into `Thu, 03 Dec 2026 07:06:00 +0000` (UTC; the host passes
//! the time, see `hooks::Now`). Must never: read a clock, allocate, or panic for any input.

use bytes::{BufMut, BytesMut};

const DAYS: [&[u8; 3]; 7] = [b"Thu", b"Fri", b"Sat", b"Sun", b"Mon", b"Tue", b"Wed"];
const MONTHS: [&[u8; 3]; 12] = [
    b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec",
];

/// Civil date from days since 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn put_2(out: &mut BytesMut, n: u32) {
    out.put_u8(b'0' + (n / 10 % 10) as u8);
    out.put_u8(b'0' + (n % 10) as u8);
}

/// Appends the RFC 5322 date-time of `unix_secs` (UTC, `+0000`).
pub fn rfc5322(out: &mut BytesMut, unix_secs: u64) {
    // Years past 9999 would not fit the 4-digit form; clamp (a clock that far off is a
    // host bug, and a header must still be well-formed).
    let secs = unix_secs.min(253_402_300_799) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400) as u32;
    let (y, m, d) = civil(days);
    out.put_slice(DAYS[days.rem_euclid(7) as usize]);
    out.put_slice(b", ");
    // Two digits, as the `time` crate's RFC 2822 format wrote it before (1*2DIGIT).
    put_2(out, d);
    out.put_u8(b' ');
    out.put_slice(MONTHS[(m - 1) as usize]);
    out.put_u8(b' ');
    let y = y as u32;
    put_2(out, y / 100);
    put_2(out, y % 100);
    out.put_u8(b' ');
    put_2(out, rem / 3600);
    out.put_u8(b':');
    put_2(out, rem / 60 % 60);
    out.put_u8(b':');
    put_2(out, rem % 60);
    out.put_slice(b" +0000");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fmt(t: u64) -> String {
        let mut b = BytesMut::new();
        rfc5322(&mut b, t);
        String::from_utf8(b.to_vec()).unwrap()
    }

    #[test]
    fn known_dates() {
        assert_eq!(fmt(0), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(fmt(951_782_400), "Tue, 29 Feb 2000 00:00:00 +0000");
        assert_eq!(fmt(1_796_281_560), "Thu, 03 Dec 2026 07:06:00 +0000");
        assert_eq!(fmt(4_107_542_399), "Sun, 28 Feb 2100 23:59:59 +0000");
        assert_eq!(fmt(u64::MAX), "Fri, 31 Dec 9999 23:59:59 +0000");
    }

    #[test]
    fn agrees_with_the_time_crate() {
        use time::format_description::well_known::Rfc2822;
        let mut t: u64 = 1;
        while t < 250_000_000_000 {
            let want = time::OffsetDateTime::from_unix_timestamp(t as i64)
                .unwrap()
                .format(&Rfc2822)
                .unwrap();
            assert_eq!(fmt(t), want, "{t}");
            t = t * 3 + 12_345;
        }
    }
}
