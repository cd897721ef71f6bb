//! Reading `worker.toml` section by section, collecting every problem instead of stopping at the
//! first.
//!
//! Each section is deserialized through its struct (`deny_unknown_fields`, every field with a
//! default). When that fails, each key is tried alone — a one-key table, the other fields taking
//! their defaults — so every unknown key and every wrong value in the section is reported, each
//! under its own `section.key`, and the section is then built from the keys that were fine. The
//! structs stay the only statement of the schema: this module knows no key names.
//!
//! Retired keys are listed in [`DEPRECATED`]: still accepted, ignored, and reported as a warning.

use std::fmt;
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use toml::{Table, Value};

/// A key that the worker no longer reads: accepted (so an old file still loads), ignored, and
/// reported as a warning saying what to do instead.
#[derive(Debug, Clone, Copy)]
pub struct Deprecated {
    pub section: &'static str,
    pub key: &'static str,
    /// What replaced it, or why it is no longer needed.
    pub note: &'static str,
}

/// Keys retired from the schema. Retiring one: remove its field from the section's struct and
/// add a line here.
pub const DEPRECATED: &[Deprecated] = &[Deprecated {
    section: "ranking_log",
    key: "spill_dir",
    note: "ranking-log rows now wait in Redis (the `[keys] log` stream), never on the local disk; remove it",
}];

/// One thing wrong (or, for a warning, worth changing) in the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `section.key`, or the section alone for an unknown section.
    pub key: String,
    pub message: String,
}

/// Problems found so far, in the order found.
#[derive(Debug, Default)]
pub(crate) struct Problems(pub(crate) Vec<Problem>);

impl Problems {
    pub(crate) fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    /// Records a problem unless `value` lies in `range`.
    pub(crate) fn range(&mut self, key: &str, value: u64, range: std::ops::RangeInclusive<u64>) {
        if !range.contains(&value) {
            self.push(
                key,
                format!(
                    "{value} is out of range (allowed: {} to {})",
                    range.start(),
                    range.end()
                ),
            );
        }
    }
}

/// Everything wrong with one configuration file. Displays as one line per problem.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.problems.len();
        write!(
            f,
            "invalid configuration in {}: {count} problem{}",
            self.file.display(),
            if count == 1 { "" } else { "s" }
        )?;
        for problem in &self.problems {
            write!(f, "\n  {}", Located(&self.file, problem))?;
        }
        Ok(())
    }
}

/// A problem with the file and key it is about: `worker.toml: `coupon.batch_size`: …`.
pub(crate) struct Located<'a>(pub(crate) &'a std::path::Path, pub(crate) &'a Problem);

impl fmt::Display for Located<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Located(file, problem) = self;
        if problem.key.is_empty() {
            write!(f, "{}: {}", file.display(), problem.message)
        } else {
            write!(
                f,
                "{}: `{}`: {}",
                file.display(),
                problem.key,
                problem.message
            )
        }
    }
}

/// Takes sections out of the file's table; whatever is left at the end is unknown.
pub(crate) struct Reader {
    root: Table,
    deprecated: &'static [Deprecated],
    pub(crate) problems: Problems,
    pub(crate) warnings: Problems,
}

impl Reader {
    pub(crate) fn new(root: Table, deprecated: &'static [Deprecated]) -> Self {
        Self {
            root,
            deprecated,
            problems: Problems::default(),
            warnings: Problems::default(),
        }
    }

    /// Reads section `name` through `T`; `None` only if even `T`'s defaults do not deserialize
    /// (a bug, reported as a problem).
    pub(crate) fn section<T: DeserializeOwned>(&mut self, name: &str) -> Option<T> {
        let mut table = match self.root.remove(name) {
            None => Table::new(),
            Some(Value::Table(table)) => table,
            Some(other) => {
                self.problems.push(
                    name,
                    format!("expected a section, found a {}", other.type_str()),
                );
                Table::new()
            }
        };
        for retired in self.deprecated.iter().filter(|d| d.section == name) {
            if table.remove(retired.key).is_some() {
                self.warnings.push(
                    format!("{name}.{}", retired.key),
                    format!("deprecated and ignored: {}", retired.note),
                );
            }
        }
        if let Ok(section) = T::deserialize(Value::Table(table.clone())) {
            return Some(section);
        }
        // Something in the section is wrong: find every key that is, keep the others.
        let mut good = Table::new();
        for (key, value) in table {
            let mut alone = Table::new();
            alone.insert(key.clone(), value.clone());
            match T::deserialize(Value::Table(alone)) {
                Ok(_) => {
                    good.insert(key, value);
                }
                Err(e) => self
                    .problems
                    .push(format!("{name}.{key}"), describe(&e, &value)),
            }
        }
        match T::deserialize(Value::Table(good)) {
            Ok(section) => Some(section),
            Err(e) => {
                self.problems.push(name, e.message().to_owned());
                T::deserialize(Value::Table(Table::new())).ok()
            }
        }
    }

    /// Reports the sections nobody read, and hands back what was found.
    pub(crate) fn finish(mut self) -> (Problems, Problems) {
        for name in self.root.keys() {
            self.problems.push(name.clone(), "unknown section");
        }
        (self.problems, self.warnings)
    }
}

/// serde's message, with the TOML type of the value when it was the wrong type.
fn describe(error: &toml::de::Error, value: &Value) -> String {
    let message = error.message();
    if message.starts_with("invalid type") {
        format!("wrong type ({}): {message}", value.type_str())
    } else if message.starts_with("unknown field") {
        format!("unknown key ({message})")
    } else {
        message.to_owned()
    }
}
