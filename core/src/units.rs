//! Humane sizes (`512MiB`, `4GiB`, `1048576`) and durations (`500ms`, `10s`, `5m`, `1h`).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A size in bytes, parsed from and printed as `512MiB`-style text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const KIB: u64 = 1 << 10;
    pub const MIB: u64 = 1 << 20;
    pub const GIB: u64 = 1 << 30;
    pub const TIB: u64 = 1 << 40;

    pub const fn mib(n: u64) -> Self {
        ByteSize(n * Self::MIB)
    }

    pub const fn gib(n: u64) -> Self {
        ByteSize(n * Self::GIB)
    }

    pub const fn bytes(self) -> u64 {
        self.0
    }
}

/// Why a size or a duration did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {input:?}: {reason}")]
pub struct UnitError {
    what: &'static str,
    input: String,
    reason: &'static str,
}

fn split_number(s: &str) -> (&str, &str) {
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    (&s[..end], s[end..].trim())
}

impl FromStr for ByteSize {
    type Err = UnitError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason| UnitError {
            what: "size",
            input: input.to_string(),
            reason,
        };
        let s = input.trim();
        let (number, unit) = split_number(s);
        if number.is_empty() {
            return Err(err(
                "expected a number followed by a unit such as 512MiB or 4GiB",
            ));
        }
        let multiplier = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kib" | "ki" => ByteSize::KIB,
            "m" | "mib" | "mi" => ByteSize::MIB,
            "g" | "gib" | "gi" => ByteSize::GIB,
            "t" | "tib" | "ti" => ByteSize::TIB,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            "tb" => 1_000_000_000_000,
            _ => {
                return Err(err(
                    "unknown unit (use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB)",
                ));
            }
        };
        let bytes = if number.contains('.') {
            let value: f64 = number.parse().map_err(|_| err("not a number"))?;
            let bytes = value * multiplier as f64;
            if !bytes.is_finite() || bytes >= u64::MAX as f64 {
                return Err(err("too large"));
            }
            bytes.round() as u64
        } else {
            let value: u64 = number.parse().map_err(|_| err("not a number"))?;
            value
                .checked_mul(multiplier)
                .ok_or_else(|| err("too large"))?
        };
        Ok(ByteSize(bytes))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        for (unit, size) in [
            ("TiB", Self::TIB),
            ("GiB", Self::GIB),
            ("MiB", Self::MIB),
            ("KiB", Self::KIB),
        ] {
            if b >= size && b.is_multiple_of(size) {
                return write!(f, "{}{unit}", b / size);
            }
        }
        if b >= Self::MIB {
            return write!(f, "{:.1}MiB", b as f64 / Self::MIB as f64);
        }
        write!(f, "{b}B")
    }
}

/// Parses `250ms`, `10s`, `5m`, `1h`, `2d` or a bare number of seconds.
pub fn parse_duration(input: &str) -> Result<Duration, UnitError> {
    let err = |reason| UnitError {
        what: "duration",
        input: input.to_string(),
        reason,
    };
    let (number, unit) = split_number(input.trim());
    if number.is_empty() {
        return Err(err(
            "expected a number followed by a unit such as 500ms, 10s, 5m or 1h",
        ));
    }
    let value: f64 = number.parse().map_err(|_| err("not a number"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86400.0,
        _ => return Err(err("unknown unit (use ms, s, m, h or d)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| err("out of range"))
}

/// Writes a duration the way [`parse_duration`] reads it, in the largest unit that keeps it whole
/// (`1h`, `30s`, `250ms`): for flag defaults and messages.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ] {
        if ms >= size && ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_format_as_they_parse() {
        for text in ["1h", "30s", "250ms", "2d", "5m", "0ms", "90s"] {
            assert_eq!(format_duration(parse_duration(text).unwrap()), text);
        }
        assert_eq!(format_duration(Duration::from_secs(3600)), "1h");
    }

    #[test]
    fn sizes_parse() {
        assert_eq!("512MiB".parse::<ByteSize>().unwrap(), ByteSize(512 << 20));
        assert_eq!("4GiB".parse::<ByteSize>().unwrap(), ByteSize(4 << 30));
        assert_eq!("4G".parse::<ByteSize>().unwrap(), ByteSize(4 << 30));
        assert_eq!("1048576".parse::<ByteSize>().unwrap(), ByteSize(1 << 20));
        assert_eq!("1.5GiB".parse::<ByteSize>().unwrap(), ByteSize(3 << 29));
        assert_eq!("10 MB".parse::<ByteSize>().unwrap(), ByteSize(10_000_000));
        assert_eq!("0".parse::<ByteSize>().unwrap(), ByteSize(0));
    }

    #[test]
    fn bad_sizes_name_the_problem() {
        for bad in [
            "",
            "MiB",
            "12XB",
            "-1GiB",
            "99999999999999999999",
            "1e3",
            "20000000TiB",
        ] {
            let e = bad.parse::<ByteSize>().unwrap_err().to_string();
            assert!(e.contains("invalid size"), "{bad}: {e}");
        }
    }

    #[test]
    fn sizes_display_round_trip() {
        for s in ["4GiB", "512MiB", "64KiB", "17B"] {
            assert_eq!(s.parse::<ByteSize>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("5 weeks").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-3s").is_err());
    }
}
