//! `requeue-dead`: moving dead-lettered entries back into the queue with their original score,
//! for example after an operator fixed a coupon's stock value.

use fred::prelude::*;
use fred::types::scripts::Script;

use crate::keys::KeyTemplates;

const REQUEUE_LUA: &str = include_str!("requeue_dead.lua");
const ENTRIES_PER_CALL: u64 = 500;

/// What `requeue-dead` did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequeueReport {
    /// Entries put back into the queue.
    pub requeued: u64,
    /// Entries left in the stream because they lack a member or a numeric score.
    pub left_unreadable: u64,
}

/// Moves every readable dead-letter entry back into its queue — every coupon's, in the
/// per-coupon layout. Each call of the script moves a chunk atomically (an entry is never in
/// both places, nor in neither).
pub async fn requeue_dead(client: &Client, keys: &KeyTemplates) -> anyhow::Result<RequeueReport> {
    let mut report = RequeueReport::default();
    for queue in super::queue_keys(client, keys).await? {
        let lane = requeue_lane(client, &queue).await?;
        report.requeued += lane.requeued;
        report.left_unreadable += lane.left_unreadable;
    }
    Ok(report)
}

async fn requeue_lane(client: &Client, keys: &KeyTemplates) -> anyhow::Result<RequeueReport> {
    let script = Script::from_lua(REQUEUE_LUA);
    let mut cursor = "-".to_owned();
    let mut report = RequeueReport::default();
    loop {
        let (seen, moved, last): (u64, u64, String) = script
            .evalsha_with_reload(
                client,
                vec![keys.dead.clone(), keys.queue.clone()],
                vec![cursor.clone(), ENTRIES_PER_CALL.to_string()],
            )
            .await?;
        report.requeued += moved;
        report.left_unreadable += seen - moved;
        if seen == 0 {
            return Ok(report);
        }
        cursor = last;
    }
}
