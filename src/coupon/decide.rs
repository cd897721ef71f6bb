//! Deciding one batch of queue entries with one call of `decide.lua`.
//!
//! The batch is read from the head of the queue (lowest score first, ties by member), parsed
//! here, and sent to the script with every key it will touch listed in KEYS. The script claims
//! each entry by removing it from the queue, so entries another replica decided in the meantime
//! come back as [`Outcome::Gone`] and are not decided twice. The same script records the batch's
//! ranking-log rows in the lane's log stream (read back by the ranking-log pipeline).
//!
//! A batch is `batch_size` entries, longer when those span many coupons and the entries after
//! them mostly repeat the same coupons ([`batch_len`]): the script's work per distinct coupon is
//! then shared by more requests (issue 19).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

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
    /// How many entries the next [`read_head`](Self::read_head) reads.
    reads: Arc<ReadSize>,
}

/// The longest batch a batch over many coupons grows to: `EXTEND` times `batch_size`, and at most
/// [`LONGEST_BATCH`].
const EXTEND: usize = 4;
/// The largest batch the script is written and tested for (the config's `batch_size` maximum):
/// its bulk commands are sliced, but its stall of Redis grows with the batch.
const LONGEST_BATCH: usize = 5000;
/// A batch spans many coupons when its first `batch_size` entries name more than one coupon per
/// `MANY` entries: each then carries a sizeable share of its coupon's fixed cost.
const MANY: usize = 4;
/// After reading past `batch_size` found no repeats worth a longer batch, this many batches read
/// `batch_size` entries before looking again (a look reads up to four times as much).
const LOOK_AGAIN_AFTER: u32 = 8;

/// How many entries of the head one batch takes: the first `batch_size`; if those name more than
/// one coupon per [`MANY`] entries, the batch goes on through the head in steps of a quarter of
/// `batch_size` as long as at least half of a step's entries belong to coupons already in the
/// batch, up to `longest`. A batch is always a prefix of the head, so each coupon's requests are
/// still decided in queue order. Returns the length and whether the batch spans many coupons.
/// `coupons` holds each head entry's coupon (`None`: malformed, which costs no coupon).
fn batch_len(coupons: &[Option<i64>], batch_size: usize, longest: usize) -> (usize, bool) {
    let first = coupons.len().min(batch_size);
    let mut seen: HashSet<i64> = coupons[..first].iter().flatten().copied().collect();
    let many = seen.len() * MANY > first;
    if !many {
        return (first, false);
    }
    let step = (batch_size / 4).max(1);
    let end_of_head = coupons.len().min(longest);
    let mut len = first;
    while len < end_of_head {
        let end = (len + step).min(end_of_head);
        let part = &coupons[len..end];
        let repeats = part
            .iter()
            .filter(|c| c.is_none_or(|c| seen.contains(&c)))
            .count();
        if repeats * 2 < part.len() {
            break;
        }
        seen.extend(part.iter().flatten());
        len = end;
    }
    (len, true)
}

/// The size of the next head read: `batch_size`, or the longest batch while batches over many
/// coupons can grow (see [`batch_len`]).
#[derive(Default)]
struct ReadSize {
    entries: AtomicUsize,
    /// Batches left before the next look past `batch_size`.
    skip: AtomicU32,
}

impl ReadSize {
    /// After a batch of `len` entries (`many` coupons) out of a head of `read` entries.
    fn after(&self, len: usize, many: bool, read: usize, batch_size: usize, longest: usize) {
        let (entries, skip) = if !many {
            (batch_size, 0)
        } else if len > batch_size {
            (longest, 0)
        } else if read > batch_size {
            // Looked further and the coupons did not repeat: not worth reading that far each time.
            (batch_size, LOOK_AGAIN_AFTER.saturating_sub(1))
        } else {
            match self.skip.load(Ordering::Relaxed) {
                0 => (longest, 0),
                left => (batch_size, left - 1),
            }
        };
        self.entries.store(entries, Ordering::Relaxed);
        self.skip.store(skip, Ordering::Relaxed);
    }
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
            reads: Arc::new(ReadSize {
                entries: AtomicUsize::new(batch_size),
                skip: AtomicU32::new(0),
            }),
        }
    }

    /// The queue's coupon in the per-coupon layout.
    pub fn coupon(&self) -> Option<i64> {
        self.only_coupon
    }

    /// The longest batch: [`EXTEND`] times `batch_size`, at most [`LONGEST_BATCH`].
    fn longest(&self) -> usize {
        (self.batch_size * EXTEND)
            .min(LONGEST_BATCH)
            .max(self.batch_size)
    }

    /// The first entries of the queue with their scores: `batch_size` of them, or up to the
    /// longest batch while the batches span many coupons (see [`batch_len`]).
    pub async fn read_head(&self) -> anyhow::Result<Head> {
        let entries = self.reads.entries.load(Ordering::Relaxed).max(1);
        Ok(self
            .client
            .zrange(
                &self.keys.queue,
                0,
                entries as i64 - 1,
                None,
                false,
                None,
                true,
            )
            .await?)
    }

    /// The script's KEYS and ARGV for a batch (see decide.lua's header).
    fn script_input(
        &self,
        head: &[(Bytes, f64)],
        parsed: &[Result<Request, &str>],
    ) -> (Vec<String>, Vec<Value>) {
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
        for request in parsed.iter().flatten() {
            let next = coupon_index.len() + 1;
            coupon_index.entry(request.coupon_id).or_insert_with(|| {
                self.coupon_keys.push(request.coupon_id, &mut keys);
                next
            });
        }
        // Last, wherever the coupons' keys end: the marker the script checks first.
        keys.push(self.keys.reconciled_marker());
        let mut args: Vec<Value> = Vec::with_capacity(2 + head.len() * 3);
        args.push(coupon_index.len().to_string().into());
        args.push(head.len().to_string().into());
        for ((member, _), request) in head.iter().zip(parsed) {
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
        (keys, args)
    }

    /// Decides `head` (as read by [`read_head`](Self::read_head)). With `read_next`, the next
    /// head is read in the same round trip: the ZRANGE is sent right behind the script on the
    /// same connection, so Redis runs it just after the script and it sees the queue without this
    /// batch. (If the script had to be reloaded, the ZRANGE ran first and the next head repeats
    /// entries decided here; the next script finds them gone and leaves them alone.)
    /// Only the batch's entries are decided (see [`batch_len`]); the rest of `head` stays queued
    /// and comes back in the next head.
    pub async fn decide_head(
        &self,
        mut head: Head,
        read_next: bool,
    ) -> anyhow::Result<(Vec<Decision>, Option<Head>)> {
        if head.is_empty() {
            return Ok((Vec::new(), None));
        }

        let mut parsed: Vec<Result<Request, &str>> = head
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
        let coupons: Vec<Option<i64>> = parsed
            .iter()
            .map(|r| r.as_ref().ok().map(|r| r.coupon_id))
            .collect();
        let read = head.len();
        let (len, many) = batch_len(&coupons, self.batch_size, self.longest());
        head.truncate(len);
        parsed.truncate(len);
        self.reads
            .after(len, many, read, self.batch_size, self.longest());

        // EVALSHA, and EVALSHA again after loading the script if Redis does not have it. (Not
        // fred's `evalsha_with_reload`, which copies every key and argument for the second try.)
        let decide = async {
            let (keys, args) = self.script_input(&head, &parsed);
            match self
                .client
                .evalsha::<Vec<Value>, _, _, _>(self.script.sha1().clone(), keys, args)
                .await
            {
                Err(error) if error.details().starts_with("NOSCRIPT") => {
                    self.script.load(&self.client).await?;
                    let (keys, args) = self.script_input(&head, &parsed);
                    self.client
                        .evalsha::<Vec<Value>, _, _, _>(self.script.sha1().clone(), keys, args)
                        .await
                }
                result => result,
            }
        };
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
        let odd = KeyTemplates {
            stock: "s:{couponId}:x:{couponId}".into(),
            result: "{couponId}".into(),
            issued: "issued".into(),
            ..KeyTemplates::default()
        };
        for keys in [
            KeyTemplates::default(),
            KeyTemplates::per_coupon_layout(),
            odd,
        ] {
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

    /// `coupon` of entry `i` for `n` entries.
    fn head(n: usize, coupon: impl Fn(usize) -> Option<i64>) -> Vec<Option<i64>> {
        (0..n).map(coupon).collect()
    }

    #[test]
    fn a_batch_over_few_coupons_is_batch_size_long() {
        let few = head(5000, |i| Some((i % 10) as i64 + 1));
        assert_eq!(batch_len(&few, 1000, 4000), (1000, false));
        // A short head is taken whole.
        assert_eq!(batch_len(&few[..300], 1000, 4000), (300, false));
        // One coupon per lane (the per-coupon layout).
        assert_eq!(
            batch_len(&head(5000, |_| Some(7)), 1000, 4000),
            (1000, false)
        );
    }

    #[test]
    fn a_batch_over_many_coupons_grows_while_they_repeat() {
        // 1 000 coupons in turn: every entry after the first 1 000 repeats one of them.
        let repeating = head(5000, |i| Some((i % 1000) as i64 + 1));
        assert_eq!(batch_len(&repeating, 1000, 4000), (4000, true));
        // Never past the head or the longest batch.
        assert_eq!(batch_len(&repeating[..2600], 1000, 4000), (2600, true));
        assert_eq!(batch_len(&repeating, 1000, 1000), (1000, true));
        // 20 000 coupons in turn: the next entries are new coupons, the batch stays as it was.
        let distinct = head(5000, |i| Some(i as i64 + 1));
        assert_eq!(batch_len(&distinct, 1000, 4000), (1000, true));
        // Malformed entries cost no coupon: they count as repeats.
        let malformed_tail = head(5000, |i| if i < 1000 { Some(i as i64 + 1) } else { None });
        assert_eq!(batch_len(&malformed_tail, 1000, 4000), (4000, true));
        // A step of mostly new coupons ends the batch before it.
        let mixed = head(5000, |i| {
            if i < 1500 {
                Some((i % 1000) as i64 + 1)
            } else {
                Some(i as i64 + 1)
            }
        });
        assert_eq!(batch_len(&mixed, 1000, 4000), (1500, true));
    }

    #[test]
    fn the_read_size_follows_the_batches() {
        let reads = ReadSize::default();
        let entries = || reads.entries.load(Ordering::Relaxed);
        // Few coupons: batch_size.
        reads.after(1000, false, 1000, 1000, 4000);
        assert_eq!(entries(), 1000);
        // Many coupons and nothing read beyond batch_size yet: look further next time.
        reads.after(1000, true, 1000, 1000, 4000);
        assert_eq!(entries(), 4000);
        // It grew: keep reading far.
        reads.after(4000, true, 4000, 1000, 4000);
        assert_eq!(entries(), 4000);
        // It looked and did not grow: batch_size for the next LOOK_AGAIN_AFTER batches.
        reads.after(1000, true, 4000, 1000, 4000);
        for _ in 0..LOOK_AGAIN_AFTER {
            assert_eq!(entries(), 1000);
            reads.after(1000, true, 1000, 1000, 4000);
        }
        assert_eq!(entries(), 4000);
    }
}
