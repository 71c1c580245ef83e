//! The `schedule` field: an interval (`1h`, `30m`, `1h30m`; at least 15 minutes) or a cron
//! expression (five fields, or a macro such as `@hourly`).

use std::{fmt, str::FromStr, time::Duration};

/// The shortest interval a connection may sync at (Segment's own floor for Profiles Sync).
pub const MIN_INTERVAL: Duration = Duration::from_secs(15 * 60);

/// A parsed sync schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// Every `Duration`, aligned to the Unix epoch (so `1h` fires on the hour).
    Interval(Duration),
    /// A standard five-field cron expression, or a macro (`@hourly`, `@daily`, ...), in UTC.
    Cron(String),
}

/// Why a schedule string was refused.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScheduleError {
    /// Neither an interval nor a cron expression.
    #[error(
        "schedule {0:?} is neither an interval (e.g. 1h, 30m, 1h30m) nor a cron expression (e.g. \"0 * * * *\")"
    )]
    Unrecognized(String),
    /// An interval below `MIN_INTERVAL`.
    #[error("schedule interval {0:?} is shorter than the minimum of 15m")]
    TooFrequent(String),
}

const CRON_MACROS: &[&str] = &[
    "@yearly",
    "@annually",
    "@monthly",
    "@weekly",
    "@daily",
    "@midnight",
    "@hourly",
];

impl Schedule {
    /// The default schedule: hourly.
    pub const DEFAULT: &'static str = "1h";

    fn parse_interval(s: &str) -> Option<Duration> {
        // `XhYm`, `Xh` or `Ym`: the subset of Go durations that the CRD's CEL rule accepts too.
        let (hours, rest) = match s.split_once('h') {
            Some((h, rest)) => (h.parse::<u64>().ok()?, rest),
            None => (0, s),
        };
        let minutes = match rest {
            "" => 0,
            m => m.strip_suffix('m')?.parse::<u64>().ok()?,
        };
        if s.is_empty() || s.starts_with('+') || rest.starts_with('+') {
            return None;
        }
        Some(Duration::from_secs(
            hours.checked_mul(3600)? + minutes.checked_mul(60)?,
        ))
    }
}

impl FromStr for Schedule {
    type Err = ScheduleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Some(d) = Self::parse_interval(s) {
            return if d >= MIN_INTERVAL {
                Ok(Schedule::Interval(d))
            } else {
                Err(ScheduleError::TooFrequent(s.to_string()))
            };
        }
        if CRON_MACROS.contains(&s) || s.split_whitespace().count() == 5 {
            return Ok(Schedule::Cron(s.to_string()));
        }
        Err(ScheduleError::Unrecognized(s.to_string()))
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Schedule::Interval(d) => {
                let (h, m) = (d.as_secs() / 3600, d.as_secs() % 3600 / 60);
                match (h, m) {
                    (0, m) => write!(f, "{m}m"),
                    (h, 0) => write!(f, "{h}h"),
                    (h, m) => write!(f, "{h}h{m}m"),
                }
            }
            Schedule::Cron(c) => f.write_str(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_parse_and_round_trip() {
        for (s, secs) in [("1h", 3600), ("15m", 900), ("1h30m", 5400), ("24h", 86400)] {
            let parsed: Schedule = s.parse().unwrap();
            assert_eq!(parsed, Schedule::Interval(Duration::from_secs(secs)));
            assert_eq!(parsed.to_string(), s);
        }
    }

    #[test]
    fn intervals_below_fifteen_minutes_are_refused() {
        assert_eq!(
            "14m".parse::<Schedule>(),
            Err(ScheduleError::TooFrequent("14m".into()))
        );
        assert_eq!(
            "0h".parse::<Schedule>(),
            Err(ScheduleError::TooFrequent("0h".into()))
        );
    }

    #[test]
    fn cron_expressions_and_macros_are_accepted() {
        assert_eq!(
            "0 * * * *".parse::<Schedule>(),
            Ok(Schedule::Cron("0 * * * *".into()))
        );
        assert_eq!(
            "@daily".parse::<Schedule>(),
            Ok(Schedule::Cron("@daily".into()))
        );
    }

    #[test]
    fn garbage_is_refused_with_the_value_in_the_message() {
        let err = "every hour".parse::<Schedule>().unwrap_err();
        assert!(err.to_string().contains("\"every hour\""), "{err}");
        assert!("1d".parse::<Schedule>().is_err());
        assert!("h".parse::<Schedule>().is_err());
        assert!("".parse::<Schedule>().is_err());
    }
}
