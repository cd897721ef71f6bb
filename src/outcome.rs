//! What happened to one coupon request: the one vocabulary the decide script's reply, the drain's
//! report, the metrics, the `ranking_logs` rows and the tools' reports all speak.
//!
//! Adding an outcome is one edit here: a variant, its place in [`Outcome::ALL`], and its arm in
//! `Outcome::facts` (the compiler points at the arm; a test checks `ALL`). The decide script
//! must of course learn to return its code.

use std::fmt;
use std::ops::{AddAssign, Index, IndexMut};

use serde::{Deserialize, Serialize};

/// What happened to one queue entry. Serialized (e.g. in a ranking-log row waiting to be
/// written) as its `ranking_logs` name: `ISSUED`, `DUPLICATE`, `SOLD_OUT`, `UNKNOWN_COUPON`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Outcome {
    Issued,
    Duplicate,
    SoldOut,
    UnknownCoupon,
    /// Moved to the dead-letter stream: not decided (decided when requeued).
    DeadLettered,
    /// Decided by another replica between our read and our script.
    Gone,
}

/// Everything the worker says about one outcome, in one place.
struct Facts {
    /// The one-letter code `decide.lua` returns.
    code: u8,
    /// The metric label and the log field name.
    label: &'static str,
    /// In the human reports.
    phrase: &'static str,
    /// Its `ranking_logs` row: `ISSUED`, or the reason of a `FAILED` row; `None`: no row.
    row: Option<&'static str>,
    /// Decided by this worker (counted in `decided`).
    decided: bool,
}

impl Outcome {
    /// Every outcome, in report order.
    pub const ALL: [Outcome; 6] = [
        Self::Issued,
        Self::Duplicate,
        Self::SoldOut,
        Self::UnknownCoupon,
        Self::DeadLettered,
        Self::Gone,
    ];

    const fn facts(self) -> Facts {
        let (code, label, phrase, row, decided) = match self {
            Self::Issued => (b'I', "issued", "issued", Some("ISSUED"), true),
            Self::Duplicate => (b'D', "duplicate", "duplicate", Some("DUPLICATE"), true),
            Self::SoldOut => (b'S', "sold_out", "sold out", Some("SOLD_OUT"), true),
            Self::UnknownCoupon => (
                b'U',
                "unknown_coupon",
                "unknown coupon",
                Some("UNKNOWN_COUPON"),
                true,
            ),
            // Its row is written when it is requeued and decided.
            Self::DeadLettered => (b'X', "dead_lettered", "dead-lettered", None, true),
            Self::Gone => (b'G', "gone", "taken by other replicas", None, false),
        };
        Facts {
            code,
            label,
            phrase,
            row,
            decided,
        }
    }

    /// The outcome `decide.lua` means by `code`.
    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.facts().code == code)
    }

    /// The one-letter code `decide.lua` returns (and writes in the log stream).
    pub fn code(self) -> u8 {
        self.facts().code
    }

    /// The label used in metrics and log fields.
    pub fn label(self) -> &'static str {
        self.facts().label
    }

    /// What `ranking_logs` records: `ISSUED`, or the reason of a `FAILED` row. `None` when the
    /// outcome makes no row.
    pub fn row_name(self) -> Option<&'static str> {
        self.facts().row
    }

    /// Whether this worker decided the request (everything but [`Outcome::Gone`]).
    pub fn is_decided(self) -> bool {
        self.facts().decided
    }
}

/// The phrase used in reports: "sold out", "taken by other replicas", …
impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.facts().phrase)
    }
}

/// How many requests had each outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutcomeCounts([u64; Outcome::ALL.len()]);

impl OutcomeCounts {
    /// Requests decided here (every outcome but [`Outcome::Gone`]).
    pub fn decided(&self) -> u64 {
        self.iter()
            .filter(|(o, _)| o.is_decided())
            .map(|(_, n)| n)
            .sum()
    }

    /// Each outcome with its count, in [`Outcome::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = (Outcome, u64)> + '_ {
        Outcome::ALL.into_iter().map(|o| (o, self[o]))
    }
}

impl Index<Outcome> for OutcomeCounts {
    type Output = u64;

    fn index(&self, outcome: Outcome) -> &u64 {
        &self.0[outcome as usize]
    }
}

impl IndexMut<Outcome> for OutcomeCounts {
    fn index_mut(&mut self, outcome: Outcome) -> &mut u64 {
        &mut self.0[outcome as usize]
    }
}

impl AddAssign<&OutcomeCounts> for OutcomeCounts {
    fn add_assign(&mut self, other: &OutcomeCounts) {
        for (mine, theirs) in self.0.iter_mut().zip(other.0) {
            *mine += theirs;
        }
    }
}

/// `2 issued, 0 duplicate, …, 0 dead-lettered; 5 taken by other replicas`: every outcome, the
/// ones decided elsewhere after a semicolon, so a report reads the same whatever happened.
impl fmt::Display for OutcomeCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let decided = self.iter().filter(|(o, _)| o.is_decided());
        let elsewhere = self.iter().filter(|(o, _)| !o.is_decided());
        for (i, (outcome, count)) in decided.chain(elsewhere).enumerate() {
            match i {
                0 => {}
                _ if !outcome.is_decided() => f.write_str("; ")?,
                _ => f.write_str(", ")?,
            }
            write!(f, "{count} {outcome}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_outcome_once_in_declaration_order() {
        for (i, outcome) in Outcome::ALL.into_iter().enumerate() {
            assert_eq!(outcome as usize, i, "{outcome:?}");
            assert_eq!(Outcome::from_code(outcome.facts().code), Some(outcome));
        }
        assert_eq!(Outcome::from_code(b'?'), None);
    }

    #[test]
    fn counts_add_up_and_gone_is_not_decided() {
        let mut counts = OutcomeCounts::default();
        counts[Outcome::Issued] += 2;
        counts[Outcome::Gone] += 5;
        let mut total = counts;
        total += &counts;
        assert_eq!(total[Outcome::Issued], 4);
        assert_eq!(total.decided(), 4);
        assert_eq!(
            counts.to_string(),
            "2 issued, 0 duplicate, 0 sold out, 0 unknown coupon, 0 dead-lettered; 5 taken by other replicas"
        );
    }

    #[test]
    fn log_rows_keep_their_names() -> Result<(), serde_json::Error> {
        assert_eq!(serde_json::to_string(&Outcome::SoldOut)?, "\"SOLD_OUT\"");
        assert_eq!(Outcome::SoldOut.row_name(), Some("SOLD_OUT"));
        assert_eq!(Outcome::Gone.row_name(), None);
        Ok(())
    }
}
