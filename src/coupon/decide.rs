//! Deciding one batch of queue entries with one call of `decide.lua`.
//!
//! The batch is read from the head of the queue (lowest score first, ties by member), parsed
//! here, and sent to the script with every key it will touch listed in KEYS. The script claims
//! each entry by removing it from the queue, so entries another replica decided in the meantime
//! come back as [`Outcome::Gone`] and are not decided twice. The same script records the batch's
//! ranking-log rows in the lane's log stream (read back by the ranking-log pipeline).

use std::collections::HashMap;

use fred::bytes::Bytes;
use fred::prelude::*;
use fred::types::scripts::Script;

use super::member::{Request, parse_member};
use crate::keys::{COUPON_ID, KeyTemplates};
use crate::outcome::Outcome;

const DECIDE_LUA: &str = include_str!("decide.lua");

/// One entry's decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// As text, for logs (a member that is not UTF-8 shows its bytes escaped, `\xff`).
    pub member: String,
    /// `None` for malformed members.
    pub request: Option<Request>,
    pub outcome: Outcome,
    /// 1-based arrival order among the coupon's decided requests; 0 when not decided here.
    pub rank: i64,
    /// Enqueue time in ms (the entry's score).
    pub enqueued_ms: f64,
}

/// Queue entries `(member, score)` in queue order. Members are bytes as the API wrote them: one
/// that is not UTF-8 is malformed like any other (dead-lettered with its bytes), not a reply
/// that fails the whole batch — which stalled the queue behind it for good.
pub(crate) type Head = Vec<(Bytes, f64)>;

/// A member as text for people: itself when it is UTF-8, else its bytes escaped (`\xff`), so
/// nothing is hidden and nothing fails.
pub(crate) fn member_text(member: &[u8]) -> String {
    match std::str::from_utf8(member) {
        Ok(text) => text.to_owned(),
        Err(_) => member.escape_ascii().to_string(),
    }
}

/// Decides batches from the head of the queue.
#[derive(Clone)]
pub struct Decider {
    client: Client,
    keys: KeyTemplates,
    script: Script,
    batch_size: usize,
    /// In the per-coupon layout, the queue's coupon: a request for another coupon there is
    /// dead-lettered (its keys would live in another cluster slot).
    only_coupon: Option<i64>,
    /// The stock, issued, seq and result templates cut at `{couponId}`.
    coupon_keys: CouponKeys,
}

/// A coupon's four key templates (stock, issued, seq, result, the script's order) cut at
/// `{couponId}`, so that naming a coupon's keys is concatenation: a batch can span a thousand
/// coupons (issue 19), and `str::replace` searching each template for each of them showed in
/// profiles. Gives what [`KeyTemplates::stock`] and the others give.
#[derive(Clone)]
struct CouponKeys {
    pieces: [Vec<String>; 4],
}

impl CouponKeys {
    fn new(keys: &KeyTemplates) -> Self {
        let cut = |template: &str| template.split(COUPON_ID).map(str::to_owned).collect();
        Self {
            pieces: [
                cut(&keys.stock),
                cut(&keys.issued),
                cut(&keys.seq),
                cut(&keys.result),
            ],
        }
    }

    /// Appends `coupon_id`'s four keys to `keys`.
    fn push(&self, coupon_id: i64, keys: &mut Vec<String>) {
        let id = coupon_id.to_string();
        for pieces in &self.pieces {
            let length = pieces.iter().map(String::len).sum::<usize>()
                + id.len() * pieces.len().saturating_sub(1);
            let mut key = String::with_capacity(length);
            for (n, piece) in pieces.iter().enumerate() {
                if n > 0 {
                    key.push_str(&id);
                }
                key.push_str(piece);
            }
            keys.push(key);
        }
    }
}

impl Decider {
    /// `keys` name the queue, dead-letter stream and outbox to use (see
    /// [`KeyTemplates::for_coupon`]); `only_coupon` is the queue's coupon in the per-coupon layout.
    pub fn new(
        client: Client,
        keys: KeyTemplates,
        batch_size: usize,
        only_coupon: Option<i64>,
    ) -> Self {
        Self {
            coupon_keys: CouponKeys::new(&keys),
            client,
            keys,
            script: Script::from_lua(DECIDE_LUA),
            batch_size,
            only_coupon,
        }
    }

    /// The queue's coupon in the per-coupon layout.
    pub fn coupon(&self) -> Option<i64> {
        self.only_coupon
    }

    /// The first `batch_size` entries of the queue with their scores.
    pub async fn read_head(&self) -> anyhow::Result<Head> {
        Ok(self
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
            .await?)
    }

    /// Decides `head` (as read by [`read_head`](Self::read_head)). With `read_next`, the next
    /// head is read in the same round trip: the ZRANGE is sent right behind the script on the
    /// same connection, so Redis runs it just after the script and it sees the queue without this
    /// batch. (If the script had to be reloaded, the ZRANGE ran first and the next head repeats
    /// entries decided here; the next script finds them gone and leaves them alone.)
    pub async fn decide_head(
        &self,
        head: Head,
        read_next: bool,
    ) -> anyhow::Result<(Vec<Decision>, Option<Head>)> {
        if head.is_empty() {
            return Ok((Vec::new(), None));
        }

        // Coupons in first-seen order; the script gets their keys in that order.
        let mut coupon_index: HashMap<i64, usize> = HashMap::new();
        let mut keys = Vec::with_capacity(6 + 4 * head.len());
        keys.extend([
            self.keys.queue.clone(),
            self.keys.dead.clone(),
            self.keys.outbox.clone(),
            self.keys.log.clone(),
            self.keys.log_rows(),
        ]);
        let mut args: Vec<Value> = Vec::with_capacity(2 + head.len() * 5);
        let parsed: Vec<Result<Request, &str>> = head
            .iter()
            .map(|(m, _)| {
                let text = std::str::from_utf8(m).map_err(|_| "malformed member: not UTF-8");
                text.and_then(parse_member)
                    .and_then(|r| match self.only_coupon {
                        Some(coupon) if r.coupon_id != coupon => {
                            Err("request for another coupon in this coupon's queue")
                        }
                        _ => Ok(r),
                    })
            })
            .collect();
        for request in parsed.iter().flatten() {
            let next = coupon_index.len() + 1;
            coupon_index.entry(request.coupon_id).or_insert_with(|| {
                self.coupon_keys.push(request.coupon_id, &mut keys);
                next
            });
        }
        // Last, wherever the coupons' keys end: the marker the script checks first.
        keys.push(self.keys.reconciled_marker());
        args.push(coupon_index.len().to_string().into());
        args.push(head.len().to_string().into());
        for ((member, _), request) in head.iter().zip(&parsed) {
            // The bytes as read: the script removes and dead-letters exactly this member.
            args.push(Value::Bytes(member.clone()));
            match request {
                Ok(r) => {
                    let index = coupon_index.get(&r.coupon_id).copied().unwrap_or(0);
                    args.push(index.to_string().into());
                    args.push(r.user_id.to_string().into());
                }
                Err(reason) => {
                    args.push("0".into());
                    args.push((*reason).into());
                }
            }
        }

        let decide = self
            .script
            .evalsha_with_reload::<Vec<Value>, _, _>(&self.client, keys, args);
        let (reply, next) = if read_next {
            let (reply, next) = tokio::join!(decide, self.read_head());
            (reply?, next.ok())
        } else {
            (decide.await?, None)
        };
        let codes = reply
            .first()
            .and_then(|v| v.as_bytes())
            .map(<[u8]>::to_vec)
            .unwrap_or_default();
        if codes.len() != head.len() || reply.len() != head.len() + 1 {
            anyhow::bail!(
                "decide script returned {} outcomes and {} items for {} entries",
                codes.len(),
                reply.len(),
                head.len()
            );
        }
        let mut decisions = Vec::with_capacity(head.len());
        for ((((member, score), request), code), rank) in
            head.into_iter().zip(parsed).zip(codes).zip(&reply[1..])
        {
            let outcome = Outcome::from_code(code).ok_or_else(|| {
                anyhow::anyhow!(
                    "decide script returned an unknown outcome {:?}",
                    char::from(code)
                )
            })?;
            decisions.push(Decision {
                member: member_text(&member),
                request: request.ok(),
                outcome,
                rank: rank.as_i64().unwrap_or(0),
                enqueued_ms: score,
            });
        }
        Ok((decisions, next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cut templates name exactly the keys the templates resolve to, in both layouts and
    /// with a template that names the coupon twice or not at all.
    #[test]
    fn coupon_keys_are_the_templates_resolved() {
        let mut odd = KeyTemplates::default();
        odd.stock = "s:{couponId}:x:{couponId}".into();
        odd.result = "{couponId}".into();
        odd.issued = "issued".into();
        for keys in [KeyTemplates::default(), KeyTemplates::per_coupon_layout(), odd] {
            let cut = CouponKeys::new(&keys);
            for coupon in [1, 7, 20_000, i64::MAX] {
                let mut named = Vec::new();
                cut.push(coupon, &mut named);
                assert_eq!(
                    named,
                    [
                        keys.stock(coupon),
                        keys.issued(coupon),
                        keys.seq(coupon),
                        keys.result(coupon)
                    ]
                );
            }
        }
    }
}
