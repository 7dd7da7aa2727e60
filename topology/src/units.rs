//! Units as types. One parser per unit, shared by the YAML loader, the CLI and the controller API.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a unit string was refused. The message says what would be valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("empty value (expected {expected})")]
    Empty { expected: &'static str },
    #[error("{value:?} has no unit (expected {expected})")]
    MissingUnit {
        value: String,
        expected: &'static str,
    },
    #[error("unknown unit {unit:?} in {value:?} (expected {expected})")]
    UnknownUnit {
        value: String,
        unit: String,
        expected: &'static str,
    },
    #[error("{value:?} is not a number (expected {expected})")]
    BadNumber {
        value: String,
        expected: &'static str,
    },
    #[error("{value:?} must be greater than zero")]
    NotPositive { value: String },
    /// Positive, but finer than the unit the value is kept in.
    #[error("{value:?} is below the smallest value, {min}")]
    TooSmall { value: String, min: &'static str },
    #[error("{value:?} is not a whole number of bits per second")]
    NotWhole { value: String },
    #[error("{value:?} is out of range (at most {max})")]
    OutOfRange { value: String, max: &'static str },
    #[error("{value:?} is negative")]
    Negative { value: String },
    /// `MBps` and its kin are bytes per second by convention; rates are in bits, and reading
    /// one as the other would be off by eight.
    #[error(
        "{value:?} reads as bytes per second: rates are in bits per second (write {bits:?} for that many bytes per second)"
    )]
    BytesPerSecond { value: String, bits: String },
    /// A bytes-per-second rate whose rate in bits would be refused too (`1.4Bps` is 11.2 bits
    /// per second): the reason, and no rate to write, since any one suggested would be refused
    /// in turn.
    #[error(
        "{value:?} reads as bytes per second: rates are in bits per second, and that many bytes per second {why}"
    )]
    UnusableBytesPerSecond { value: String, why: String },
}

const LATENCY_UNITS: &str =
    "a positive number with a unit: ns, us, ms or s, e.g. \"12ms\" or \"850us\"";
const BANDWIDTH_UNITS: &str =
    "a positive number with a unit: bps, Kbps, Mbps, Gbps or Tbps, e.g. \"10Gbps\" or \"500Mbps\"";

/// The significant digits after the decimal point of the number `s` starts with ("1.250ms":
/// 2), as [`split_number`] reads it.
fn fraction_digits(s: &str) -> usize {
    let (num, _) = number_and_rest(s.trim());
    let num: String = num.chars().filter(|c| *c != '_').collect();
    num.split_once('.')
        .map_or(0, |(_, f)| f.trim_end_matches('0').len())
}

/// `s` (trimmed) split where its number ends: digits, `.`, signs and `_` separators.
fn number_and_rest(s: &str) -> (&str, &str) {
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+' || c == '_'))
        .unwrap_or(s.len());
    s.split_at(end)
}

/// Splits "12.5ms" into (12.5, "ms"). Accepts optional whitespace between number and unit.
fn split_number<'a>(s: &'a str, expected: &'static str) -> Result<(f64, &'a str), UnitError> {
    let s = s.trim();
    if s.is_empty() {
        return Err(UnitError::Empty { expected });
    }
    let (num, unit) = number_and_rest(s);
    let unit = unit.trim();
    if unit.is_empty() {
        return Err(UnitError::MissingUnit {
            value: s.to_string(),
            expected,
        });
    }
    let cleaned: String = num.chars().filter(|c| *c != '_').collect();
    let n: f64 = cleaned.parse().map_err(|_| UnitError::BadNumber {
        value: s.to_string(),
        expected,
    })?;
    if !n.is_finite() {
        return Err(UnitError::BadNumber {
            value: s.to_string(),
            expected,
        });
    }
    Ok((n, unit))
}

/// A one-way link latency (or a path cost, which is a sum of them). Always positive when it
/// comes from a parsed string; a path cost of zero (an edge that is also the site) is allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Latency(Duration);

impl Latency {
    pub const ZERO: Latency = Latency(Duration::ZERO);
    /// Upper bound accepted from operator input: one minute one-way is certainly a typo.
    pub const MAX: Latency = Latency(Duration::from_secs(60));

    pub const fn from_duration(d: Duration) -> Self {
        Latency(d)
    }
    pub const fn from_micros(us: u64) -> Self {
        Latency(Duration::from_micros(us))
    }
    pub const fn from_nanos(ns: u64) -> Self {
        Latency(Duration::from_nanos(ns))
    }
    pub fn from_millis_f64(ms: f64) -> Self {
        Latency(Duration::from_secs_f64((ms / 1000.0).max(0.0)))
    }
    pub const fn as_duration(self) -> Duration {
        self.0
    }
    pub fn as_nanos(self) -> u64 {
        u64::try_from(self.0.as_nanos()).unwrap_or(u64::MAX)
    }
    pub fn as_micros(self) -> u64 {
        u64::try_from(self.0.as_micros()).unwrap_or(u64::MAX)
    }
    pub fn as_millis_f64(self) -> f64 {
        self.0.as_secs_f64() * 1000.0
    }
    pub fn saturating_add(self, other: Latency) -> Latency {
        Latency(self.0.saturating_add(other.0))
    }

    /// Reads a latency as [`Display`](fmt::Display) prints it, exactly (integer arithmetic, no
    /// float): any value from zero up to `u64::MAX` ns, in ns, us, ms or s, with a decimal
    /// fraction. For stored data and API answers, whose latencies are sums (a path's
    /// [`saturating_add`](Self::saturating_add) of link latencies) that may exceed
    /// [`Latency::MAX`]. Operator input goes through [`FromStr`] instead: positive, at most
    /// [`Latency::MAX`].
    pub fn read_back(s: &str) -> Result<Latency, UnitError> {
        const EXPECTED: &str = "a number with a unit: ns, us, ms or s, e.g. \"12ms\" or \"70s\"";
        let t = s.trim();
        if t.is_empty() {
            return Err(UnitError::Empty { expected: EXPECTED });
        }
        let end = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(end);
        let unit = unit.trim();
        let bad = || UnitError::BadNumber {
            value: t.to_string(),
            expected: EXPECTED,
        };
        if num.is_empty() {
            return Err(if latency_secs(t).is_ok_and(|n| n < 0.0) {
                UnitError::Negative {
                    value: t.to_string(),
                }
            } else {
                bad()
            });
        }
        if unit.is_empty() {
            return Err(UnitError::MissingUnit {
                value: t.to_string(),
                expected: EXPECTED,
            });
        }
        let scale: u128 = match unit {
            "ns" => 1,
            "us" | "µs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            other => {
                return Err(UnitError::UnknownUnit {
                    value: t.to_string(),
                    unit: other.to_string(),
                    expected: EXPECTED,
                });
            }
        };
        let (int, frac) = num.split_once('.').unwrap_or((num, ""));
        if (int.is_empty() && frac.is_empty()) || frac.contains('.') {
            return Err(bad());
        }
        let too_big = || UnitError::OutOfRange {
            value: t.to_string(),
            max: "18446744073.709551615s",
        };
        // Whole units, digit by digit, checked: a long string of digits is out of range, not
        // an overflow.
        let mut ns: u128 = 0;
        for d in int.bytes() {
            ns = ns
                .checked_mul(10)
                .and_then(|n| n.checked_add(u128::from(d - b'0')))
                .filter(|n| *n <= u128::from(u64::MAX))
                .ok_or_else(too_big)?;
        }
        ns = ns.checked_mul(scale).ok_or_else(too_big)?;
        // The fraction, rounded to the nanosecond: ten digits are one more than a second has
        // nanosecond digits.
        let frac = &frac[..frac.len().min(10)];
        if !frac.is_empty() {
            let digits: u128 = frac.parse().map_err(|_| bad())?;
            let denom = 10u128.pow(frac.len() as u32);
            ns += (digits * scale + denom / 2) / denom;
        }
        u64::try_from(ns)
            .map(Latency::from_nanos)
            .map_err(|_| too_big())
    }
}

/// The seconds a latency string says, any sign (a number and one of the latency units).
fn latency_secs(s: &str) -> Result<f64, UnitError> {
    let (n, unit) = split_number(s, LATENCY_UNITS)?;
    Ok(match unit {
        "ns" => n / 1e9,
        "us" | "µs" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        other => {
            return Err(UnitError::UnknownUnit {
                value: s.trim().to_string(),
                unit: other.to_string(),
                expected: LATENCY_UNITS,
            });
        }
    })
}

impl FromStr for Latency {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let secs = latency_secs(s)?;
        if secs <= 0.0 {
            return Err(UnitError::NotPositive {
                value: s.trim().to_string(),
            });
        }
        if secs > Latency::MAX.0.as_secs_f64() {
            return Err(UnitError::OutOfRange {
                value: s.trim().to_string(),
                max: "60s",
            });
        }
        let d = Duration::from_secs_f64(secs);
        if d.is_zero() {
            return Err(UnitError::TooSmall {
                value: s.trim().to_string(),
                min: "1ns",
            });
        }
        Ok(Latency(d))
    }
}

impl fmt::Display for Latency {
    /// The shortest exact form: "12ms", "850us", "1.5ms", "250ns".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ns = self.as_nanos();
        if ns == 0 {
            write!(f, "0ms")
        } else if ns.is_multiple_of(1_000_000_000) {
            write!(f, "{}s", ns / 1_000_000_000)
        } else if ns.is_multiple_of(1_000_000) {
            write!(f, "{}ms", ns / 1_000_000)
        } else if ns >= 1_000_000 && ns.is_multiple_of(1_000) {
            // Exact at any size (a float loses digits past 2^53 ns): "1.5ms", "70001.25ms".
            let frac = format!("{:03}", ns % 1_000_000 / 1_000);
            write!(f, "{}.{}ms", ns / 1_000_000, frac.trim_end_matches('0'))
        } else if ns.is_multiple_of(1_000) {
            write!(f, "{}us", ns / 1_000)
        } else {
            write!(f, "{ns}ns")
        }
    }
}

impl Serialize for Latency {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Latency {
    /// Reads back exactly whatever [`Display`](fmt::Display) prints ([`Latency::read_back`]):
    /// zero (a path cost or a load penalty can be zero) and sums above [`Latency::MAX`] (a
    /// path's latency, a candidate's cost, stored in circuit records and read back by the
    /// CLI). Operator input goes through [`FromStr`], which refuses both.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Latency::read_back(&s).map_err(serde::de::Error::custom)
    }
}

/// A link capacity or a circuit rate, in bits per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Bandwidth(u64);

impl Bandwidth {
    pub const ZERO: Bandwidth = Bandwidth(0);

    pub const fn from_bps(bps: u64) -> Self {
        Bandwidth(bps)
    }
    pub const fn from_mbps(mbps: u64) -> Self {
        Bandwidth(mbps.saturating_mul(1_000_000))
    }
    pub const fn bps(self) -> u64 {
        self.0
    }
    /// Bytes per second, for token buckets.
    pub const fn bytes_per_sec(self) -> u64 {
        self.0 / 8
    }
    pub fn checked_sub(self, other: Bandwidth) -> Option<Bandwidth> {
        self.0.checked_sub(other.0).map(Bandwidth)
    }
    pub fn saturating_sub(self, other: Bandwidth) -> Bandwidth {
        Bandwidth(self.0.saturating_sub(other.0))
    }
    pub fn saturating_add(self, other: Bandwidth) -> Bandwidth {
        Bandwidth(self.0.saturating_add(other.0))
    }
}

impl FromStr for Bandwidth {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_bandwidth(s, true)
    }
}

impl Bandwidth {
    /// `s` read as builds before session 41 read it: a fraction of a bit per second within a
    /// float's tolerance (`1.0009bps`, `1000000000000.5bps`) taken and rounded. For a text
    /// stored by such a build only, which an upgraded controller must still start on.
    pub fn parse_as_before(s: &str) -> Result<Bandwidth, UnitError> {
        parse_bandwidth(s, false)
    }
}

/// A rate; `by_digits`: whole by its decimal digits as written (`FromStr`), else within a
/// float's tolerance ([`Bandwidth::parse_as_before`]).
fn parse_bandwidth(s: &str, by_digits: bool) -> Result<Bandwidth, UnitError> {
    let (n, unit) = split_number(s, BANDWIDTH_UNITS)?;
    // Case-insensitive, except the bytes-per-second spelling (`MBps`, `GBps`, `Bps`...):
    // it is refused rather than read as bits, eight times too small. The capital `B` says
    // bytes whatever the prefix's case: `10gBps` and `10mBps` are the same mistake.
    if let Some(prefix) = unit.strip_suffix("Bps")
        && matches!(
            prefix.to_ascii_lowercase().as_str(),
            "" | "k" | "m" | "g" | "t"
        )
    {
        let bits = format!("{}{}bps", n * 8.0, prefix.to_ascii_uppercase());
        let value = s.trim().to_string();
        // Only a rate in bits that is taken is suggested (one refused in turn helps
        // nobody): over the limit, the limit is the word; otherwise the reason it is
        // refused, without the rate.
        let why = match bits.parse::<Bandwidth>() {
            Ok(_) => return Err(UnitError::BytesPerSecond { value, bits }),
            Err(UnitError::OutOfRange { .. }) => {
                return Err(UnitError::OutOfRange {
                    value,
                    max: "1000Tbps",
                });
            }
            Err(UnitError::NotWhole { .. }) => {
                "is not a whole number of bits per second".to_string()
            }
            Err(UnitError::TooSmall { min, .. }) => {
                format!("is below the smallest value, {min}")
            }
            Err(UnitError::NotPositive { .. }) => "is not greater than zero".to_string(),
            Err(_) => "is not a rate in bits per second".to_string(),
        };
        return Err(UnitError::UnusableBytesPerSecond { value, why });
    }
    let (mult, exp): (f64, usize) = match unit.to_ascii_lowercase().as_str() {
        "bps" => (1.0, 0),
        "kbps" => (1e3, 3),
        "mbps" => (1e6, 6),
        "gbps" => (1e9, 9),
        "tbps" => (1e12, 12),
        _ => {
            return Err(UnitError::UnknownUnit {
                value: s.trim().to_string(),
                unit: unit.to_string(),
                expected: BANDWIDTH_UNITS,
            });
        }
    };
    let bps = n * mult;
    if bps <= 0.0 {
        return Err(UnitError::NotPositive {
            value: s.trim().to_string(),
        });
    }
    if bps < 1.0 {
        return Err(UnitError::TooSmall {
            value: s.trim().to_string(),
            min: "1bps",
        });
    }
    // 1 Pbps: far above any link we model, far below u64 overflow.
    if bps > 1e15 {
        return Err(UnitError::OutOfRange {
            value: s.trim().to_string(),
            max: "1000Tbps",
        });
    }
    // A fraction of a bit per second is a typo, not a rate ("1.4bps" was 1 bps). Told from
    // the decimal digits as written, not the float: a whole rate reads back a little off
    // ("1.1Gbps" is 1.1 x 10^9 and a little), and a tolerance for that took fractions of
    // large rates ("1000000000000.5bps").
    let fraction = if by_digits {
        fraction_digits(s) > exp
    } else {
        (bps - bps.round()).abs() > (bps * 1e-12).max(1e-3)
    };
    if fraction {
        return Err(UnitError::NotWhole {
            value: s.trim().to_string(),
        });
    }
    Ok(Bandwidth(bps.round() as u64))
}

impl fmt::Display for Bandwidth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        for (div, unit) in [
            (1_000_000_000_000, "Tbps"),
            (1_000_000_000, "Gbps"),
            (1_000_000, "Mbps"),
            (1_000, "Kbps"),
        ] {
            if b >= div {
                return if b.is_multiple_of(div) {
                    write!(f, "{}{unit}", b / div)
                } else {
                    write!(f, "{}{unit}", b as f64 / div as f64)
                };
            }
        }
        write!(f, "{b}bps")
    }
}

impl Serialize for Bandwidth {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Bandwidth {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte rate whose rate in bits is refused in turn (not a whole number of bits, under
    /// 1bps, not positive) says why, with no rate to write: it suggested "11.2bps" for
    /// `1.4Bps`, "0.8bps" for `0.1Bps`, "0bps" for `0Bps`. A suggestion given is always taken.
    #[test]
    fn a_byte_rate_that_is_refused_in_bits_too_gets_no_suggestion() {
        let why = |s: &str| s.parse::<Bandwidth>().unwrap_err().to_string();
        let base = "reads as bytes per second: rates are in bits per second, and that many bytes \
                    per second";
        for (bytes, reason) in [
            ("1.4Bps", "is not a whole number of bits per second"),
            ("0.1Bps", "is below the smallest value, 1bps"),
            ("0.0001KBps", "is below the smallest value, 1bps"),
            ("0Bps", "is not greater than zero"),
            ("-1MBps", "is not greater than zero"),
        ] {
            assert_eq!(why(bytes), format!("{bytes:?} {base} {reason}"));
        }
        for bytes in [
            "1.4Bps", "0.1Bps", "0Bps", "1.5Bps", "0.125Bps", "0.3KBps", "1.1GBps", "7.7MBps",
            "0.7TBps", "125TBps",
        ] {
            let e = why(bytes);
            if let Some(rest) = e.split("write \"").nth(1) {
                let suggested = rest.split('"').next().unwrap();
                assert!(suggested.parse::<Bandwidth>().is_ok(), "{bytes}: {e}");
            }
        }
    }

    /// Each refusal gives the real reason, and a suggestion is one that would be taken.
    #[test]
    fn unit_refusals_say_why_and_suggest_only_what_is_taken() {
        let why = |s: &str, f: fn(&str) -> Option<UnitError>| f(s).unwrap().to_string();
        let bw = |s: &str| s.parse::<Bandwidth>().err();
        let lat = |s: &str| s.parse::<Latency>().err();
        assert_eq!(
            why("0.5bps", bw),
            "\"0.5bps\" is below the smallest value, 1bps"
        );
        assert_eq!(
            why("0.4ns", lat),
            "\"0.4ns\" is below the smallest value, 1ns"
        );
        assert_eq!(why("0bps", bw), "\"0bps\" must be greater than zero");
        assert_eq!(
            why("1.4bps", bw),
            "\"1.4bps\" is not a whole number of bits per second"
        );
        assert_eq!("1.1Gbps".parse::<Bandwidth>().unwrap().bps(), 1_100_000_000);
        assert!("2.5bps".parse::<Bandwidth>().is_err());
        // Wholeness is the decimal digits', not a float's within a tolerance: fractions of
        // large rates, and small fractions of small ones, were taken and rounded.
        for fraction in [
            "1000000000000.5bps",
            "1.0009bps",
            "1.0000000001Gbps",
            "3.0000000000001Tbps",
        ] {
            assert_eq!(
                why(fraction, bw),
                format!("\"{fraction}\" is not a whole number of bits per second")
            );
        }
        assert_eq!(
            "1.000000001Gbps".parse::<Bandwidth>().unwrap().bps(),
            1_000_000_001
        );
        assert_eq!("2.500000Kbps".parse::<Bandwidth>().unwrap().bps(), 2_500);
        assert_eq!("1_000.5Kbps".parse::<Bandwidth>().unwrap().bps(), 1_000_500);
        assert!(
            "1.15GBps"
                .parse::<Bandwidth>()
                .err()
                .unwrap()
                .to_string()
                .contains("9.2Gbps")
        );
        assert_eq!("0.001Kbps".parse::<Bandwidth>().unwrap().bps(), 1);
        assert_eq!(
            why("200TBps", bw),
            "\"200TBps\" is out of range (at most 1000Tbps)"
        );
        let e = why("100TBps", bw);
        assert!(
            e.contains("write \"800TBps\"") || e.contains("write \"800Tbps\""),
            "{e}"
        );
        let suggested = e
            .split("write \"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        assert!(suggested.parse::<Bandwidth>().is_ok(), "{suggested}");
    }

    #[test]
    fn latency_parses_and_prints() {
        assert_eq!(
            "12ms".parse::<Latency>().unwrap(),
            Latency::from_micros(12_000)
        );
        assert_eq!(
            "850us".parse::<Latency>().unwrap(),
            Latency::from_micros(850)
        );
        assert_eq!("1.5ms".parse::<Latency>().unwrap().to_string(), "1.5ms");
        assert_eq!("850us".parse::<Latency>().unwrap().to_string(), "850us");
        assert!(matches!(
            "0ms".parse::<Latency>(),
            Err(UnitError::NotPositive { .. })
        ));
        // serde reads back what Display prints, zero included (a path cost can be zero); a
        // negative value stays refused.
        for l in [
            Latency::ZERO,
            Latency::from_micros(850),
            Latency::from_nanos(1),
            Latency::MAX,
        ] {
            let json = serde_json::to_string(&l).unwrap();
            assert_eq!(serde_json::from_str::<Latency>(&json).unwrap(), l, "{json}");
        }
        assert!(serde_json::from_str::<Latency>("\"-3ms\"").is_err());
        assert!(serde_json::from_str::<Latency>("\"0\"").is_err());
        assert!(matches!(
            "-3ms".parse::<Latency>(),
            Err(UnitError::NotPositive { .. })
        ));
        assert!(matches!(
            "12".parse::<Latency>(),
            Err(UnitError::MissingUnit { .. })
        ));
        assert!(matches!(
            "12 parsecs".parse::<Latency>(),
            Err(UnitError::UnknownUnit { .. })
        ));
        assert!(matches!(
            "99999s".parse::<Latency>(),
            Err(UnitError::OutOfRange { .. })
        ));
    }

    /// A sum of latencies above `Latency::MAX` (a path of two 35 s links; a candidate's cost)
    /// reads back through serde: it is stored in circuit records and read back by the CLI, and
    /// a record that cannot be read makes the whole circuits table unreadable. Operator input
    /// (`FromStr`) keeps its limit.
    #[test]
    fn sums_above_max_read_back_but_operator_input_keeps_its_limit() {
        let link: Latency = "35s".parse().unwrap();
        let path = link.saturating_add(link);
        let json = serde_json::to_string(&path).unwrap();
        assert_eq!(json, "\"70s\"");
        assert_eq!(serde_json::from_str::<Latency>(&json).unwrap(), path);
        assert!(matches!(
            "70s".parse::<Latency>(),
            Err(UnitError::OutOfRange { .. })
        ));
        for (text, ns) in [
            ("70001.25ms", 70_001_250_000),
            ("1.5ms", 1_500_000),
            ("0.5s", 500_000_000),
            ("18446744073709551615ns", u64::MAX),
            ("18446744073.709551615s", u64::MAX),
        ] {
            assert_eq!(
                Latency::read_back(text),
                Ok(Latency::from_nanos(ns)),
                "{text}"
            );
        }
        for (text, why) in [
            ("18446744073709551616ns", "out of range"),
            ("99999999999999999999999999s", "out of range"),
            ("-70s", "is negative"),
            ("70", "has no unit"),
            ("70 parsecs", "unknown unit"),
            ("1.2.3ms", "not a number"),
            ("ms", "not a number"),
        ] {
            let e = Latency::read_back(text).unwrap_err().to_string();
            assert!(e.contains(why), "{text}: {e}");
        }
    }

    proptest::proptest! {
        /// Every latency, zero to `u64::MAX` ns, reads back through serde as exactly itself:
        /// Display prints it exactly and the deserializer reads it exactly.
        #[test]
        fn every_latency_round_trips_through_serde(ns in proptest::prelude::any::<u64>()) {
            let l = Latency::from_nanos(ns);
            let json = serde_json::to_string(&l).unwrap();
            let back = serde_json::from_str::<Latency>(&json);
            proptest::prop_assert_eq!(back.as_ref().ok(), Some(&l), "{}: {:?}", json, back);
        }

        /// Latencies printed in milliseconds with a fraction (whole microseconds, at least
        /// 1 ms), the form a float printed inexactly past 2^53 ns.
        #[test]
        fn fractional_milliseconds_round_trip(us in 1_000..=u64::MAX / 1_000) {
            let l = Latency::from_micros(us);
            let json = serde_json::to_string(&l).unwrap();
            let back = serde_json::from_str::<Latency>(&json);
            proptest::prop_assert_eq!(back.as_ref().ok(), Some(&l), "{}: {:?}", json, back);
        }

        /// Every operator value up to the limit reads back through serde as itself.
        #[test]
        fn latencies_up_to_max_read_back(ns in 1..=Latency::MAX.as_nanos()) {
            let l = Latency::from_nanos(ns);
            let json = serde_json::to_string(&l).unwrap();
            proptest::prop_assert_eq!(serde_json::from_str::<Latency>(&json).ok(), Some(l), "{}", json);
        }
    }

    #[test]
    fn bandwidth_parses_and_prints() {
        assert_eq!("10Gbps".parse::<Bandwidth>().unwrap().bps(), 10_000_000_000);
        assert_eq!(
            "500Mbps".parse::<Bandwidth>().unwrap().to_string(),
            "500Mbps"
        );
        assert_eq!(
            "1.5Gbps".parse::<Bandwidth>().unwrap().to_string(),
            "1.5Gbps"
        );
        assert!(matches!(
            "10GB".parse::<Bandwidth>(),
            Err(UnitError::UnknownUnit { .. })
        ));
        assert!(matches!(
            "0Mbps".parse::<Bandwidth>(),
            Err(UnitError::NotPositive { .. })
        ));
        // Any case reads as bits, but the bytes-per-second spelling is refused, not read as
        // bits (eight times too small), and the message gives the rate in bits.
        assert_eq!("100MBPS".parse::<Bandwidth>().unwrap().bps(), 100_000_000);
        assert_eq!("100mbps".parse::<Bandwidth>().unwrap().bps(), 100_000_000);
        assert_eq!("100Kbps".parse::<Bandwidth>().unwrap().bps(), 100_000);
        for (bytes, bits) in [
            ("100MBps", "800Mbps"),
            ("1.5GBps", "12Gbps"),
            ("10kBps", "80Kbps"),
            ("64Bps", "512bps"),
            ("2TBps", "16Tbps"),
            // The unit prefix in either case: only the `Bps` says bytes, and `10gBps` read as
            // bits is the same eight-fold mistake.
            ("10gBps", "80Gbps"),
            ("10mBps", "80Mbps"),
            ("10tBps", "80Tbps"),
            ("10KBps", "80Kbps"),
        ] {
            let err = bytes.parse::<Bandwidth>().unwrap_err();
            assert_eq!(
                err,
                UnitError::BytesPerSecond {
                    value: bytes.to_string(),
                    bits: bits.to_string()
                },
                "{bytes}"
            );
            assert!(err.to_string().contains("bits per second"), "{err}");
        }
    }
}
