//! Deciding one batch of queue entries with one call of `decide.lua`.
//!
//! The batch is read from the head of the queue (lowest score first, ties by member), parsed
//! here, and sent to the script with every key it will touch listed in KEYS. The script claims
//! each entry by removing it from the queue, so entries another replica decided in the meantime
//! come back as [`Outcome::Gone`] and are not decided twice.

use std::collections::HashMap;

use fred::prelude::*;
use fred::types::scripts::Script;

use super::member::{Request, parse_member};
use crate::keys::KeyTemplates;

const DECIDE_LUA: &str = include_str!("decide.lua");

/// What happened to one queue entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Issued,
    Duplicate,
    SoldOut,
    UnknownCoupon,
    /// Moved to the dead-letter stream.
    DeadLettered,
    /// Decided by another replica between our read and our script.
    Gone,
}

impl Outcome {
    fn from_reply(text: &str) -> Option<Self> {
        Some(match text {
            "ISSUED" => Self::Issued,
            "DUPLICATE" => Self::Duplicate,
            "SOLD_OUT" => Self::SoldOut,
            "UNKNOWN_COUPON" => Self::UnknownCoupon,
            "DEAD" => Self::DeadLettered,
            "GONE" => Self::Gone,
            _ => return None,
        })
    }

    /// The label used in metrics and reports.
    pub fn label(self) -> &'static str {
        match self {
            Self::Issued => "issued",
            Self::Duplicate => "duplicate",
            Self::SoldOut => "sold_out",
            Self::UnknownCoupon => "unknown_coupon",
            Self::DeadLettered => "dead_lettered",
            Self::Gone => "gone",
        }
    }
}

/// One entry's decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub member: String,
    /// `None` for malformed members.
    pub request: Option<Request>,
    pub outcome: Outcome,
    /// 1-based arrival order among the coupon's decided requests; 0 when not decided here.
    pub rank: i64,
    /// Enqueue time in ms (the entry's score).
    pub enqueued_ms: f64,
}

/// Decides batches from the head of the queue.
#[derive(Clone)]
pub struct Decider {
    client: Client,
    keys: KeyTemplates,
    script: Script,
    batch_size: usize,
}

impl Decider {
    pub fn new(client: Client, keys: KeyTemplates, batch_size: usize) -> Self {
        Self {
            client,
            keys,
            script: Script::from_lua(DECIDE_LUA),
            batch_size,
        }
    }

    /// Decides up to `batch_size` entries from the head of the queue. An empty result means the
    /// queue was empty.
    pub async fn decide_batch(&self) -> anyhow::Result<Vec<Decision>> {
        let head: Vec<(String, f64)> = self
            .client
            .zrange(
                &self.keys.queue,
                0,
                self.batch_size as i64 - 1,
                None,
                false,
                None,
                true,
            )
            .await?;
        if head.is_empty() {
            return Ok(Vec::new());
        }

        // Coupons in first-seen order; the script gets their keys in that order.
        let mut coupon_index: HashMap<i64, usize> = HashMap::new();
        let mut keys = vec![
            self.keys.queue.clone(),
            self.keys.dead.clone(),
            self.keys.outbox.clone(),
        ];
        let mut args: Vec<String> = Vec::with_capacity(2 + head.len() * 5);
        let parsed: Vec<Result<Request, &str>> =
            head.iter().map(|(m, _)| parse_member(m)).collect();
        for request in parsed.iter().flatten() {
            let next = coupon_index.len() + 1;
            coupon_index.entry(request.coupon_id).or_insert_with(|| {
                let c = request.coupon_id;
                keys.extend([
                    self.keys.stock(c),
                    self.keys.issued(c),
                    self.keys.seq(c),
                    self.keys.result(c),
                ]);
                next
            });
        }
        args.push(coupon_index.len().to_string());
        args.push(head.len().to_string());
        for ((member, score), request) in head.iter().zip(&parsed) {
            args.push(member.clone());
            args.push(format_score(*score));
            match request {
                Ok(r) => {
                    args.push(
                        coupon_index
                            .get(&r.coupon_id)
                            .copied()
                            .unwrap_or(0)
                            .to_string(),
                    );
                    args.push(r.user_id.to_string());
                    args.push(String::new());
                }
                Err(reason) => {
                    args.push("0".to_owned());
                    args.push(String::new());
                    args.push((*reason).to_owned());
                }
            }
        }

        let reply: Vec<Value> = self
            .script
            .evalsha_with_reload(&self.client, keys, args)
            .await?;
        if reply.len() != head.len() * 3 {
            anyhow::bail!(
                "decide script returned {} items for {} entries",
                reply.len(),
                head.len()
            );
        }
        let mut decisions = Vec::with_capacity(head.len());
        for (((member, score), request), item) in
            head.into_iter().zip(parsed).zip(reply.chunks_exact(3))
        {
            let outcome_text = item[1].as_str().unwrap_or_default();
            let outcome = Outcome::from_reply(&outcome_text).ok_or_else(|| {
                anyhow::anyhow!("decide script returned an unknown outcome {outcome_text:?}")
            })?;
            decisions.push(Decision {
                member,
                request: request.ok(),
                outcome,
                rank: item[2].as_i64().unwrap_or(0),
                enqueued_ms: score,
            });
        }
        Ok(decisions)
    }
}

/// A score as Redis would accept it back (`ZADD`), exactly: Rust prints the shortest string
/// that round-trips, and queue scores are integral milliseconds anyway.
pub fn format_score(score: f64) -> String {
    if score.fract() == 0.0 && score.abs() < 1e15 {
        format!("{score:.0}")
    } else {
        format!("{score}")
    }
}
