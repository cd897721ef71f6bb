//! One log-stream entry: the ranking-log rows of one decided batch, as `decide.lua` wrote them.
//!
//! Fields (see the script's header): `m` the decided members `userId:couponId` joined by
//! spaces, `r` their ranks joined by spaces, `o` one outcome letter each (I/D/S/U). The entry
//! id's milliseconds, from Redis' clock, are the decision time. About 20 bytes a row.

use chrono::DateTime;

use super::LogRow;
use crate::coupon::member::parse_member;
use crate::outcome::Outcome;

/// The fields as stored, byte for byte, kept to move an entry to the dead-letter stream
/// unchanged: an entry whose fields are not even UTF-8 (written by hand, damaged) keeps its
/// bytes there, for a person to see and `requeue-log-dead` to move back as they were.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawFields {
    pub members: Vec<u8>,
    pub ranks: Vec<u8>,
    pub outcomes: Vec<u8>,
}

impl RawFields {
    /// The stream entry's fields as `decide.lua` writes them (for tests and the benchmark, which
    /// `XADD` entries without deciding).
    pub fn into_fields(self) -> Vec<(&'static str, Vec<u8>)> {
        vec![("m", self.members), ("r", self.ranks), ("o", self.outcomes)]
    }
}

/// `bytes` as text, or why not (the bytes shown with invalid sequences replaced, for the
/// dead letter's reason only: the entry itself keeps them).
fn text<'a>(field: &str, bytes: &'a [u8]) -> Result<&'a str, String> {
    std::str::from_utf8(bytes).map_err(|_| {
        format!(
            "field {field} is not UTF-8: {:?}",
            String::from_utf8_lossy(bytes)
        )
    })
}

/// A decoded entry.
#[derive(Debug, Clone, PartialEq)]
pub struct LogEntry {
    /// The stream it was read from.
    pub stream: String,
    /// Its stream id, `<ms>-<seq>`.
    pub id: String,
    pub rows: Vec<LogRow>,
    pub raw: RawFields,
}

impl LogEntry {
    /// The id that makes its insert idempotent: stream key and entry id, plus the first row's
    /// member and rank, so an id reused after Redis lost the stream (a restart from nothing with
    /// the clock set back) cannot be mistaken for a batch already written.
    pub fn batch_id(&self) -> String {
        let first = self
            .rows
            .first()
            .map(|r| format!("{}:{}#{}", r.user_id, r.coupon_id, r.rank))
            .unwrap_or_default();
        format!("{} {} {first}", self.stream, self.id)
    }

    /// Decodes one entry; an error says what is wrong with it (it is then dead-lettered).
    pub fn decode(stream: &str, id: &str, raw: RawFields) -> Result<Self, String> {
        let ms: i64 = id
            .split_once('-')
            .and_then(|(ms, _)| ms.parse().ok())
            .ok_or_else(|| format!("entry id {id:?} is not <ms>-<seq>"))?;
        let decided_at = DateTime::from_timestamp_millis(ms)
            .ok_or_else(|| format!("entry id {id:?} is not a time"))?;
        let members: Vec<&str> = text("m", &raw.members)?
            .split(' ')
            .filter(|m| !m.is_empty())
            .collect();
        let ranks: Vec<&str> = text("r", &raw.ranks)?
            .split(' ')
            .filter(|r| !r.is_empty())
            .collect();
        let codes = raw.outcomes.as_slice();
        if members.len() != ranks.len() || members.len() != codes.len() {
            return Err(format!(
                "{} members, {} ranks and {} outcomes",
                members.len(),
                ranks.len(),
                codes.len()
            ));
        }
        let mut rows = Vec::with_capacity(members.len());
        for ((member, rank), code) in members.iter().zip(&ranks).zip(codes) {
            let request = parse_member(member).map_err(|e| format!("{member:?}: {e}"))?;
            // `ranking_logs.rank` is an INT and ranks start at 1: anything else would be written
            // wrong (clamped or negative), so the entry is dead-lettered instead.
            let rank: i64 = rank
                .parse()
                .ok()
                .filter(|r| (1..=i64::from(i32::MAX)).contains(r))
                .ok_or_else(|| format!("rank {rank:?}"))?;
            let outcome = Outcome::from_code(*code)
                .filter(|o| o.row_name().is_some())
                .ok_or_else(|| format!("outcome {:?}", char::from(*code)))?;
            rows.push(LogRow {
                user_id: request.user_id,
                coupon_id: request.coupon_id,
                rank,
                outcome,
                decided_at,
                retry_count: 0,
            });
        }
        Ok(Self {
            stream: stream.to_owned(),
            id: id.to_owned(),
            rows,
            raw,
        })
    }

    /// Encodes rows as the script does (for tests and the benchmark, which write entries
    /// without deciding).
    pub fn encode(rows: &[LogRow]) -> RawFields {
        let mut raw = RawFields::default();
        for (i, row) in rows.iter().enumerate() {
            if i > 0 {
                raw.members.push(b' ');
                raw.ranks.push(b' ');
            }
            raw.members
                .extend_from_slice(format!("{}:{}", row.user_id, row.coupon_id).as_bytes());
            raw.ranks.extend_from_slice(row.rank.to_string().as_bytes());
            raw.outcomes.push(row.outcome.code());
        }
        raw
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_decodes_into_its_rows_timed_by_its_id() {
        let raw = RawFields {
            members: "12:7 13:7 5:9".into(),
            ranks: "1 2 40".into(),
            outcomes: "ISU".into(),
        };
        let entry = LogEntry::decode("log", "1700000000123-4", raw.clone()).unwrap();
        assert_eq!(entry.rows.len(), 3);
        assert_eq!(entry.rows[2].user_id, 5);
        assert_eq!(entry.rows[2].coupon_id, 9);
        assert_eq!(entry.rows[2].rank, 40);
        assert_eq!(entry.rows[2].outcome, Outcome::UnknownCoupon);
        assert_eq!(
            entry.rows[0].decided_at.timestamp_millis(),
            1_700_000_000_123
        );
        assert_eq!(LogEntry::encode(&entry.rows), raw);
        assert_eq!(entry.batch_id(), "log 1700000000123-4 12:7#1");
    }

    #[test]
    fn a_damaged_entry_says_what_is_wrong() {
        let raw = |m: &str, r: &str, o: &str| RawFields {
            members: m.into(),
            ranks: r.into(),
            outcomes: o.into(),
        };
        assert!(LogEntry::decode("log", "1-0", raw("1:2 3:4", "1", "II")).is_err());
        assert!(LogEntry::decode("log", "1-0", raw("1:x", "1", "I")).is_err());
        assert!(LogEntry::decode("log", "1-0", raw("1:2", "1", "Q")).is_err());
        assert!(LogEntry::decode("log", "bad", raw("1:2", "1", "I")).is_err());
        // Ranks start at 1 and fit the table's INT: never written clamped or negative.
        for rank in ["0", "-5", "2147483648", "99999999999"] {
            assert!(
                LogEntry::decode("log", "1-0", raw("1:2", rank, "S")).is_err(),
                "rank {rank}"
            );
        }
        assert!(LogEntry::decode("log", "1-0", raw("1:2", "2147483647", "S")).is_ok());
    }
}
