//! A lease in Redis that lets one replica at a time do something every replica could do (follow
//! the queue between ticks, sweep the whole coupon registry): a `SET NX PX` key holding the
//! holder's random token, renewed by its holder every third of its life.
//!
//! A dead or stopped holder's lease lapses after its TTL, and another replica takes it at its
//! next check. Every command is safe to send twice (fred resends a command whose reply was lost
//! after a reconnect): renewing or taking is one script that answers "held" for the holder's own
//! token whether the key was set by this call or the lost one before it; a call whose reply is
//! lost counts as not holding until Redis confirms. Releasing deletes the key only while it holds
//! the holder's token. A lease only saves work: nothing that must be correct depends on it.

use std::time::{Duration, Instant};

use fred::prelude::*;
use fred::types::scripts::Script;

/// Renews the lease if this holder (`ARGV[1]` = its token) has it, else takes it if free, for
/// `ARGV[2]` ms. Returns 1 when held afterwards. One command whoever holds the lease; sent twice
/// after a reconnect it gives the same answer.
const HOLD_LUA: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
     return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end \
     if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end \
     return 0";
/// Releasing at shutdown: only by its holder, so a successor's lease is never deleted.
const RELEASE_LUA: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
     return redis.call('DEL', KEYS[1]) else return 0 end";

/// A right held by one replica at a time (following the queue, sweeping the registry).
pub struct Lease {
    client: Client,
    key: String,
    token: String,
    ttl: Duration,
    /// What holding it lets this replica do, for the log line when it is taken.
    role: &'static str,
    hold: Script,
    /// While held: when to renew. While not: when to try to take it again.
    next_check: Option<Instant>,
    /// When Redis last confirmed this holder (taken or renewed), while held.
    confirmed_at: Option<Instant>,
}

impl Lease {
    /// A lease on `key` lasting `ttl` from each renewal; `role` says what holding it lets this
    /// replica do (for the log line when it is taken), e.g. "follows the coupon queue".
    pub fn new(client: Client, key: String, ttl: Duration, role: &'static str) -> Self {
        Self {
            client,
            key,
            token: uuid::Uuid::new_v4().to_string(),
            ttl,
            role,
            hold: Script::from_lua(HOLD_LUA),
            next_check: None,
            confirmed_at: None,
        }
    }

    /// Whether this replica holds the lease now. Asks Redis only every third of the lease (to
    /// renew it, or to try to take it): with the 2 s follow lease ~1.5 commands a second,
    /// whoever holds it.
    pub async fn hold(&mut self) -> anyhow::Result<bool> {
        let now = Instant::now();
        if self.next_check.is_some_and(|at| now < at) {
            return Ok(self.confirmed_at.is_some());
        }
        let was_held = self.confirmed_at.is_some();
        let ttl_ms = self.ttl.as_millis().max(1) as i64;
        let held: i64 = match self
            .hold
            .evalsha_with_reload(
                &self.client,
                vec![self.key.clone()],
                vec![self.token.clone(), ttl_ms.to_string()],
            )
            .await
        {
            Ok(held) => held,
            Err(e) => {
                // Unknown (the reply may be lost, the command resent): the lease may lapse
                // meanwhile; act as not holding it until Redis confirms.
                self.confirmed_at = None;
                self.next_check = None;
                return Err(e.into());
            }
        };
        self.confirmed_at = (held == 1).then_some(now);
        if held == 1 && !was_held {
            tracing::info!(lease = %self.key, "this replica now {}", self.role);
        }
        self.next_check = Some(now + self.ttl / 3);
        Ok(held == 1)
    }

    /// [`Self::hold`] asking Redis now, whenever it last asked.
    pub async fn hold_now(&mut self) -> anyhow::Result<bool> {
        self.next_check = None;
        self.hold().await
    }

    /// Until when the lease is this holder's for sure (none when not held).
    pub fn held_until(&self) -> Option<Instant> {
        self.confirmed_at.map(|at| at + self.ttl)
    }

    /// Gives the lease up (at shutdown), so another replica takes over at once.
    pub async fn release(&mut self) {
        if self.confirmed_at.take().is_none() {
            return;
        }
        let released: Result<i64, _> = Script::from_lua(RELEASE_LUA)
            .evalsha_with_reload(
                &self.client,
                vec![self.key.clone()],
                vec![self.token.clone()],
            )
            .await;
        if let Err(e) = released {
            tracing::debug!(error = %format!("{e:#}"), lease = %self.key, "lease not released; it lapses by itself");
        }
    }
}
