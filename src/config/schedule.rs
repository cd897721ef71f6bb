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

/// Why `expression` is not a schedule the worker runs, if it is not.
pub fn validate_schedule(expression: &str) -> Result<(), String> {
    let fields = expression.split_whitespace().count();
    if !(6..=7).contains(&fields) {
        return Err(format!(
            "`{expression}` has {fields} fields; expected 6 (sec min hour day month weekday)"
        ));
    }
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .dom_and_dow(true)
        .build()
        .parse(expression)
        .map_err(|e| format!("`{expression}` is not a valid cron expression: {e}"))?;
    Ok(())
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
