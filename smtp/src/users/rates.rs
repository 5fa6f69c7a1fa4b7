//! Sending rates: `COUNT/DURATION` (`"100/1m"`, `"2000/1d"`), the global
//! `auth.user_message_rate`/`auth.user_recipient_rate` and a user's own override in the
//! user store (`message-rate=`, `recipient-rate=`).
//!
//! Owns: the rate syntax and its canonical text. Must never: count anything (the engine's
//! anvil keeps the buckets) or read a clock.

use std::time::Duration;

/// At most `count` in any `per` (a token bucket of `count`, refilled at `count/per`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

/// A login's two rates (`None`: unlimited, or: the global one applies).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UserRates {
    pub messages: Option<Rate>,
    pub recipients: Option<Rate>,
}

impl UserRates {
    /// `self`'s rates, each falling back to `global`'s.
    pub fn or(self, global: UserRates) -> UserRates {
        UserRates {
            messages: self.messages.or(global.messages),
            recipients: self.recipients.or(global.recipients),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_none() && self.recipients.is_none()
    }
}

impl Rate {
    /// Parses `"100/1m"`: a whole number above 0, `/`, a whole number and a unit (`s`,
    /// `m`, `h`, `d`; `1m` is one minute). `""` is no rate.
    pub fn parse(s: &str) -> Result<Option<Rate>, String> {
        let s = s.trim();
        if s.is_empty() {
            return Ok(None);
        }
        let bad = || format!("{s:?}: expected COUNT/DURATION, e.g. \"100/1m\" or \"2000/1d\"");
        let (n, per) = s.split_once('/').ok_or_else(bad)?;
        let count: u32 = n.trim().parse().ok().filter(|c| *c > 0).ok_or_else(bad)?;
        let per = per.trim();
        let split = per.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let (num, unit) = per.split_at(split);
        let num: u64 = if num.is_empty() {
            1
        } else {
            num.parse().map_err(|_| bad())?
        };
        let secs = match unit {
            "s" | "sec" => 1,
            "m" | "min" => 60,
            "h" => 3600,
            "d" => 86_400,
            _ => return Err(bad()),
        };
        let per = num
            .checked_mul(secs)
            .filter(|s| *s > 0)
            .map(Duration::from_secs)
            .ok_or_else(bad)?;
        Ok(Some(Rate { count, per }))
    }

    /// The canonical text (`100/1m`, `2000/1d`, `5/90s`).
    pub fn to_text(&self) -> String {
        let s = self.per.as_secs();
        let per = if s % 86_400 == 0 {
            format!("{}d", s / 86_400)
        } else if s % 3600 == 0 {
            format!("{}h", s / 3600)
        } else if s % 60 == 0 {
            format!("{}m", s / 60)
        } else {
            format!("{s}s")
        };
        format!("{}/{per}", self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print() {
        for (text, count, secs, canon) in [
            ("100/1m", 100, 60, "100/1m"),
            (" 2000 / 1d ", 2000, 86_400, "2000/1d"),
            ("5/90s", 5, 90, "5/90s"),
            ("3/h", 3, 3600, "3/1h"),
            ("7/120min", 7, 7200, "7/2h"),
        ] {
            let r = Rate::parse(text).unwrap().unwrap();
            assert_eq!((r.count, r.per.as_secs()), (count, secs), "{text}");
            assert_eq!(r.to_text(), canon);
            assert_eq!(Rate::parse(&r.to_text()).unwrap(), Some(r));
        }
        assert_eq!(Rate::parse("").unwrap(), None);
        for bad in [
            "100", "0/1m", "-1/1m", "10/0m", "10/1y", "x/1m", "10/1", "10/m1",
        ] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
    }
}
