//! Cron schedules: [`validate_schedule`] is the one place that decides which expressions the
//! worker accepts, with the same parser settings the scheduler uses, so an expression that loads
//! is one the scheduler accepts.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A validated cron expression (seconds first).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct CronSchedule(String);

impl CronSchedule {
    pub fn parse(expression: &str) -> Result<Self, String> {
        validate_schedule(expression)?;
        Ok(Self(expression.to_owned()))
    }

    /// A default written in the code: not checked here, but by the test that loads an empty
    /// file (so no panic can hide in a default).
    pub(super) fn default_of(expression: &'static str) -> Self {
        Self(expression.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// How far ahead a schedule must fire at least once: a year, leap day included.
const MUST_FIRE_WITHIN_DAYS: i64 = 366;

/// Why `expression` is not a schedule the worker runs, if it is not: it must have exactly 6
/// fields (a 7th, year field parses but makes the scheduler drop the job without a word), parse
/// with the scheduler's settings, and fire at least once within the next 366 days
/// (`0 0 0 31 2 *` never does).
pub fn validate_schedule(expression: &str) -> Result<(), String> {
    validate_schedule_at(expression, chrono::Utc::now())
}

fn validate_schedule_at(
    expression: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(), String> {
    let fields = expression.split_whitespace().count();
    if fields != 6 {
        return Err(format!(
            "`{expression}` has {fields} fields; expected 6 (sec min hour day month weekday)"
        ));
    }
    let cron = croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .dom_and_dow(true)
        .build()
        .parse(expression)
        .map_err(|e| format!("`{expression}` is not a valid cron expression: {e}"))?;
    let horizon = now + chrono::Duration::days(MUST_FIRE_WITHIN_DAYS);
    match cron.find_next_occurrence(&now, false) {
        Ok(next) if next <= horizon => Ok(()),
        Ok(next) => Err(format!(
            "`{expression}` next fires on {}, more than {MUST_FIRE_WITHIN_DAYS} days from now",
            next.format("%Y-%m-%d")
        )),
        Err(_) => Err(format!(
            "`{expression}` never fires (no matching date in the next {MUST_FIRE_WITHIN_DAYS} days)"
        )),
    }
}

impl TryFrom<String> for CronSchedule {
    type Error = String;

    fn try_from(expression: String) -> Result<Self, String> {
        Self::parse(&expression)
    }
}

impl Serialize for CronSchedule {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl fmt::Debug for CronSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CronSchedule({:?})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected(result: Result<(), String>) -> String {
        match result {
            Ok(()) => panic!("accepted a schedule that should be rejected"),
            Err(e) => e,
        }
    }

    fn at(y: i32, m: u32, d: u32) -> chrono::DateTime<chrono::Utc> {
        use chrono::TimeZone;
        chrono::Utc
            .with_ymd_and_hms(y, m, d, 12, 0, 0)
            .single()
            .unwrap_or_default()
    }

    #[test]
    fn schedules_need_exactly_six_fields() {
        let now = at(2026, 11, 24);
        assert!(validate_schedule_at("*/5 * * * * *", now).is_ok());
        let five = rejected(validate_schedule_at("0 0 * * *", now));
        assert!(five.contains("has 5 fields"), "{five}");
        let seven = rejected(validate_schedule_at("0 0 0 * * * 2020", now));
        assert!(seven.contains("has 7 fields; expected 6"), "{seven}");
    }

    #[test]
    fn a_schedule_that_never_fires_within_a_year_is_rejected() {
        let now = at(2026, 11, 24);
        let never = rejected(validate_schedule_at("0 0 0 31 2 *", now));
        assert!(never.contains("never fires"), "{never}");
        // The 29th of February fires within 366 days of any day of 2027 before it (2028-02-29).
        assert!(validate_schedule_at("0 0 0 29 2 *", at(2027, 3, 1)).is_ok());
        // Seen from just after one, the next is four years away.
        let leap = rejected(validate_schedule_at("0 0 0 29 2 *", at(2028, 3, 1)));
        assert!(leap.contains("2032-02-29"), "{leap}");
        assert!(validate_schedule_at("0 0 0 * * *", now).is_ok());
    }
}
