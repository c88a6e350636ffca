//! The daemons' log lines as the log collector reads them (pure; the
//! files are each daemon's business). A line starts with its UTC time
//! (`2026-11-26T20:19:53.941319Z`) and its level; a line without them
//! continues the one before and goes with it.

use serde::{Deserialize, Serialize};

/// Severity, least severe first.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

impl LogLevel {
    fn from_word(w: &str) -> Option<LogLevel> {
        match w {
            "TRACE" => Some(LogLevel::Trace),
            "DEBUG" => Some(LogLevel::Debug),
            "INFO" => Some(LogLevel::Info),
            "WARN" => Some(LogLevel::Warn),
            "ERROR" => Some(LogLevel::Error),
            _ => None,
        }
    }
}

/// Milliseconds since the epoch of `YYYY-MM-DDTHH:MM:SS[.frac]Z`.
pub fn parse_utc_ms(s: &str) -> Option<u64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.split(':').map(|p| p.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Days since 1970-01-01 of a civil date (400-year eras).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let first3: String = frac.chars().take(3).collect();
    let ms: i64 = format!("{first3:0<3}").parse().ok()?;
    u64::try_from(((days * 24 + hh) * 60 + mm) * 60 * 1000 + ss * 1000 + ms).ok()
}

/// The time and level a line starts with, if it starts a record.
fn head(line: &str) -> Option<(u64, LogLevel)> {
    let mut words = line.split_whitespace();
    let ts = parse_utc_ms(words.next()?)?;
    Some((ts, LogLevel::from_word(words.next()?)?))
}

/// The records of `text` from `since_ms` to `until_ms` (inclusive) at
/// `min` or more severe, with their continuation lines.
pub fn filter(text: &str, since_ms: u64, until_ms: u64, min: LogLevel) -> Vec<&str> {
    let mut out = Vec::new();
    let mut keep = false;
    for line in text.lines() {
        if let Some((ts, level)) = head(line) {
            keep = ts >= since_ms && ts <= until_ms && level >= min;
        }
        if keep {
            out.push(line);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_to_epoch_milliseconds() {
        assert_eq!(parse_utc_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_utc_ms("2000-03-01T00:00:01.5Z"), Some(951_868_801_500));
        assert_eq!(parse_utc_ms("2026-11-26T20:19:53.941319Z"), Some(1_795_724_393_941));
        assert_eq!(parse_utc_ms("2026-13-26T20:19:53Z"), None);
        assert_eq!(parse_utc_ms("not a time"), None);
    }

    #[test]
    fn records_are_kept_by_time_and_level_with_their_continuations() {
        let text = "1970-01-01T00:00:01Z  INFO a: one\n\
                    1970-01-01T00:00:02Z ERROR a: two\n  more of two\n\
                    1970-01-01T00:00:03Z  WARN a: three\n\
                    1970-01-01T00:00:09Z ERROR a: late\n";
        assert_eq!(
            filter(text, 0, 5000, LogLevel::Warn),
            vec!["1970-01-01T00:00:02Z ERROR a: two", "  more of two", "1970-01-01T00:00:03Z  WARN a: three"]
        );
        assert_eq!(filter(text, 1000, 1000, LogLevel::Trace), vec!["1970-01-01T00:00:01Z  INFO a: one"]);
    }
}
