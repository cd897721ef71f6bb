//! Redis key names, built from the `[keys]` templates of `worker.toml`.
//!
//! Templates name the keys the API shares with the worker (docs/contract.md §1) and the worker's own
//! internal keys. Two placeholders exist: `{couponId}` in the per-coupon templates and `{date}` in
//! the daily ranking template. Any other `{...}` is left as written, so a Redis Cluster hash tag
//! such as `{coupon}:queue` passes through untouched.
//!
//! Keys the worker derives for itself (the ranking's temporary, lock and marker keys) are built
//! from `ranking_window`; the temporary keys always hash to its cluster slot (see
//! [`KeyTemplates::ranking_temp`]). [`KeyTemplates::cluster_problems`] says which templates
//! cannot work on Redis Cluster.

use chrono::NaiveDate;

pub const COUPON_ID: &str = "{couponId}";
pub const DATE: &str = "{date}";
const DATE_FORMAT: &str = "%Y-%m-%d";

/// A userId or couponId (docs/contract.md §1): a positive decimal `i64` with no sign, no leading
/// zero and nothing else.
pub(crate) fn parse_id(text: &str) -> Option<i64> {
    let canonical =
        !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) && !text.starts_with('0');
    if !canonical {
        return None;
    }
    text.parse::<i64>().ok()
}

/// A couponId given on the command line (`--coupon`), by the same grammar as in Redis
/// ([`parse_id`]): `007`, `+10`, `0` or `-3` are refused (a usage error, exit 64) rather than
/// read as another coupon.
pub fn parse_id_argument(text: &str) -> Result<i64, String> {
    parse_id(text).ok_or_else(|| {
        format!(
            "`{text}` is not a couponId: a positive decimal integer without sign or leading zeros, at most {}",
            i64::MAX
        )
    })
}

/// The `[keys]` section (every key optional: the defaults are [`KeyTemplates::default`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeyTemplates {
    /// ZSET of requests, member `userId:couponId`, score = enqueue time in ms (written by the API).
    pub queue: String,
    /// Remaining stock per coupon (written by the API/admin).
    pub stock: String,
    /// SET of userIds holding the coupon.
    pub issued: String,
    /// Count of decided requests per coupon; the source of each request's rank.
    pub seq: String,
    /// HASH userId -> outcome of the user's latest request.
    pub result: String,
    /// STREAM of entries that could not be decided.
    pub dead: String,
    /// ZSET of issued coupons not yet confirmed in MySQL: member `userId:couponId`, score =
    /// issue time in ms. Internal.
    pub outbox: String,
    /// STREAM of ranking-log rows waiting for MySQL: one entry per decided batch, written by the
    /// decide script with the decisions. Internal; `<log>:rows` counts the rows waiting and
    /// `<log>:dead` keeps rows MySQL rejected for good. Left out of `worker.toml` (files written
    /// before it existed), it is the queue's template with `log` for `queue`: see
    /// [`KeyTemplates::log_beside_queue`].
    #[serde(default)]
    pub log: String,
    /// SET of couponIds with a queue of their own (per-coupon layout only; written by the API).
    pub coupon_registry: String,
    /// SET of couponIds whose queues have work (per-coupon layout only): the API adds the coupon
    /// beside each ZADD, the drain removes it once the queue is empty. A hint for speed only:
    /// a periodic sweep of the registry finds queues whose coupon is missing here.
    pub coupon_active: String,
    /// ZSET of units sold per product on one day (written by the API).
    pub ranking_daily: String,
    /// ZSET: the sum of the window's daily keys.
    pub ranking_window: String,
    /// Prefix of the worker's control keys, shared by every replica: pause flags
    /// ([`Self::pause_flags`]), job run records ([`Self::job_runs`]) and replica heartbeats
    /// ([`Self::replica_heartbeat`]). Internal.
    pub control: String,
}

impl Default for KeyTemplates {
    fn default() -> Self {
        Self {
            queue: "coupon:queue".into(),
            stock: "coupon:stock:{couponId}".into(),
            issued: "coupon:issued:{couponId}".into(),
            seq: "coupon:seq:{couponId}".into(),
            result: "coupon:result:{couponId}".into(),
            dead: "coupon:dead".into(),
            outbox: "coupon:outbox".into(),
            log: "coupon:log".into(),
            coupon_registry: "coupon:registry".into(),
            coupon_active: "coupon:active".into(),
            ranking_daily: "product:ranking:{date}".into(),
            ranking_window: "product:ranking:3d".into(),
            control: "commerce-worker".into(),
        }
    }
}

impl KeyTemplates {
    /// The README's single-slot layout for Redis Cluster: every coupon key under `{coupon}`;
    /// ranking keys as by default.
    pub fn single_slot_layout() -> Self {
        Self {
            queue: "{coupon}:queue".into(),
            stock: "{coupon}:stock:{couponId}".into(),
            issued: "{coupon}:issued:{couponId}".into(),
            seq: "{coupon}:seq:{couponId}".into(),
            result: "{coupon}:result:{couponId}".into(),
            dead: "{coupon}:dead".into(),
            outbox: "{coupon}:outbox".into(),
            log: "{coupon}:log".into(),
            ..Self::default()
        }
    }

    /// The README's per-coupon layout: each coupon's queue, dead-letter stream, outbox and keys
    /// under its own tag `{coupon:<id>}`, so coupons spread over a cluster's shards.
    pub fn per_coupon_layout() -> Self {
        Self {
            queue: "{coupon:{couponId}}:queue".into(),
            stock: "{coupon:{couponId}}:stock".into(),
            issued: "{coupon:{couponId}}:issued".into(),
            seq: "{coupon:{couponId}}:seq".into(),
            result: "{coupon:{couponId}}:result".into(),
            dead: "{coupon:{couponId}}:dead".into(),
            outbox: "{coupon:{couponId}}:outbox".into(),
            log: "{coupon:{couponId}}:log".into(),
            ..Self::default()
        }
    }

    /// Every template with its `worker.toml` name, in file order.
    pub fn entries(&self) -> Vec<(&'static str, &str)> {
        vec![
            ("queue", &self.queue),
            ("stock", &self.stock),
            ("issued", &self.issued),
            ("seq", &self.seq),
            ("result", &self.result),
            ("dead", &self.dead),
            ("outbox", &self.outbox),
            ("log", &self.log),
            ("coupon_registry", &self.coupon_registry),
            ("coupon_active", &self.coupon_active),
            ("ranking_daily", &self.ranking_daily),
            ("ranking_window", &self.ranking_window),
            ("control", &self.control),
        ]
    }

    pub(crate) fn entries_mut(&mut self) -> Vec<(&'static str, &mut String)> {
        vec![
            ("queue", &mut self.queue),
            ("stock", &mut self.stock),
            ("issued", &mut self.issued),
            ("seq", &mut self.seq),
            ("result", &mut self.result),
            ("dead", &mut self.dead),
            ("outbox", &mut self.outbox),
            ("log", &mut self.log),
            ("coupon_registry", &mut self.coupon_registry),
            ("coupon_active", &mut self.coupon_active),
            ("ranking_daily", &mut self.ranking_daily),
            ("ranking_window", &mut self.ranking_window),
            ("control", &mut self.control),
        ]
    }

    /// The same templates with `prefix` in front of each: how tests and the demo get key names
    /// nobody else uses.
    pub fn with_prefix(&self, prefix: &str) -> Self {
        let mut out = self.clone();
        for (_, template) in out.entries_mut() {
            template.insert_str(0, prefix);
        }
        out
    }

    /// Problems with the templates, as `(template name, message)`.
    pub fn validate(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        for (name, template) in self.entries() {
            let wants = match name {
                "stock" | "issued" | "seq" | "result" => Some(COUPON_ID),
                // The per-coupon layout: one queue (and dead-letter stream and outbox) per coupon.
                "queue" | "dead" | "outbox" | "log" if self.per_coupon() => Some(COUPON_ID),
                "ranking_daily" => Some(DATE),
                _ => None,
            };
            let count = |p: &str| template.matches(p).count();
            if template.trim().is_empty() {
                problems.push((name, "must not be empty".to_owned()));
                continue;
            }
            match wants {
                Some(placeholder) if count(placeholder) != 1 => problems.push((
                    name,
                    format!("`{template}` must contain `{placeholder}` exactly once"),
                )),
                _ => {}
            }
            for other in [COUPON_ID, DATE] {
                if Some(other) != wants && count(other) > 0 {
                    problems.push((name, format!("`{template}` cannot use `{other}`")));
                }
            }
        }
        for (name, template) in [
            ("dead", &self.dead),
            ("outbox", &self.outbox),
            ("log", &self.log),
        ] {
            if !self.per_coupon() && template.contains(COUPON_ID) {
                problems.push((
                    name,
                    format!("`{template}` uses `{COUPON_ID}` but `keys.queue` does not: a per-coupon layout needs it in queue, dead, outbox and log"),
                ));
            }
        }
        let mut seen: Vec<(&str, &str)> = Vec::new();
        for (name, template) in self.entries() {
            if let Some((first, _)) = seen.iter().find(|(_, t)| *t == template) {
                problems.push((name, format!("is the same key as `keys.{first}`")));
            }
            seen.push((name, template));
        }
        // The worker's own keys are named after a template (`<outbox>:dead`, `<log>:rows`, …):
        // a template naming one of them would make two things share one key — `dead =
        // "coupon:outbox:dead"` puts the queue's dead letters and the coupons `user_coupon`
        // refused in one stream, and `requeue-dead` would send an issued coupon back to the
        // queue. Compared as templates: a per-coupon key keeps its `{couponId}` on both sides.
        let derived = self.derived_keys();
        for (name, template) in self.entries() {
            if let Some((what, base, _)) = derived.iter().find(|(_, _, key)| key == template) {
                problems.push((
                    name,
                    format!("`{template}` is the key the worker keeps {what} in (named after `keys.{base}`): choose another name"),
                ));
            }
        }
        for (i, (what, base, key)) in derived.iter().enumerate() {
            if let Some((other, other_base, _)) = derived[..i].iter().find(|(_, _, k)| k == key) {
                problems.push((
                    base,
                    format!("the worker would keep {what} and {other} (named after `keys.{other_base}`) in the same key `{key}`: choose other names"),
                ));
            }
        }
        problems
    }

    /// The worker's own keys named after a template, as `(what it keeps there, the template's
    /// name, the key)`; a per-coupon lane's keep `{couponId}`. Only those of the layout in use.
    fn derived_keys(&self) -> Vec<(&'static str, &'static str, String)> {
        let mut keys = vec![
            (
                "the issued coupons user_coupon refused",
                "outbox",
                // coupon::outbox::outbox_dead_key, which this floor cannot import.
                format!("{}:dead", self.outbox),
            ),
            (
                "the reconciliation marker",
                "outbox",
                self.reconciled_marker(),
            ),
            ("the ranking-log row counter", "log", self.log_rows()),
            ("the ranking-log dead letters", "log", self.log_dead()),
            (
                "the ranking rebuild's lock",
                "ranking_window",
                self.ranking_lock(),
            ),
            (
                "the live ranking's record",
                "ranking_window",
                self.ranking_live_record(),
            ),
            ("the pause flags", "control", self.pause_flags()),
            ("the job run records", "control", self.job_runs()),
        ];
        if self.per_coupon() {
            keys.push(("the follow lease", "coupon_active", self.follow_lease()));
            keys.push(("the sweep lease", "coupon_registry", self.sweep_lease()));
        } else {
            keys.push(("the follow lease", "queue", self.follow_lease()));
        }
        keys
    }

    /// The lease that lets one replica at a time follow the queue(s) between ticks: beside the
    /// active set in the per-coupon layout, beside the queue otherwise.
    pub fn follow_lease(&self) -> String {
        if self.per_coupon() {
            format!("{}:follower", self.coupon_active)
        } else {
            format!("{}:follower", self.queue)
        }
    }

    /// Per-coupon layout: the lease that lets one replica at a time run the periodic walks of the
    /// whole registry (the drain's queue sweep, the log reader's stream sweep, the outbox and
    /// log-stream SCANs, reconciling lanes ahead of their first request): beside the registry,
    /// `<coupon_registry>:sweeper`.
    pub fn sweep_lease(&self) -> String {
        format!("{}:sweeper", self.coupon_registry)
    }

    /// The default `log` template for a `queue` template: its trailing `queue` replaced by
    /// `log` (`coupon:queue` → `coupon:log`, `{coupon:{couponId}}:queue` →
    /// `{coupon:{couponId}}:log`), or `:log` appended. Either way in the queue's hash slot.
    pub fn log_beside_queue(queue: &str) -> String {
        match queue.strip_suffix("queue") {
            Some(stem) if !stem.is_empty() => format!("{stem}log"),
            _ => format!("{queue}:log"),
        }
    }

    /// The counter of ranking-log rows waiting in a (resolved) `log` stream: `<log>:rows`, in the
    /// stream's hash slot when the template has a hash tag.
    pub fn log_rows(&self) -> String {
        format!("{}:rows", self.log)
    }

    /// The stream of ranking-log rows MySQL rejected for good, with the error: `<log>:dead`.
    pub fn log_dead(&self) -> String {
        format!("{}:dead", self.log)
    }

    fn coupon_key(template: &str, coupon_id: i64) -> String {
        template.replace(COUPON_ID, &coupon_id.to_string())
    }

    /// `coupon_id`'s queue in the per-coupon layout: what [`Self::for_coupon`] resolves, without
    /// resolving the other templates (a sweep asks it for every registered coupon).
    pub fn queue_of(&self, coupon_id: i64) -> String {
        Self::coupon_key(&self.queue, coupon_id)
    }

    /// `coupon_id`'s ranking-log stream in the per-coupon layout (see [`Self::queue_of`]).
    pub fn log_of(&self, coupon_id: i64) -> String {
        Self::coupon_key(&self.log, coupon_id)
    }

    pub fn stock(&self, coupon_id: i64) -> String {
        Self::coupon_key(&self.stock, coupon_id)
    }

    pub fn issued(&self, coupon_id: i64) -> String {
        Self::coupon_key(&self.issued, coupon_id)
    }

    pub fn seq(&self, coupon_id: i64) -> String {
        Self::coupon_key(&self.seq, coupon_id)
    }

    pub fn result(&self, coupon_id: i64) -> String {
        Self::coupon_key(&self.result, coupon_id)
    }

    /// The daily ranking key for `day`.
    pub fn ranking_day(&self, day: NaiveDate) -> String {
        self.ranking_daily
            .replace(DATE, &day.format(DATE_FORMAT).to_string())
    }

    /// A SCAN `MATCH` pattern that finds every daily ranking key (and possibly other keys, which
    /// [`Self::ranking_day_of`] then rejects).
    pub fn ranking_daily_pattern(&self) -> String {
        scan_pattern(&self.ranking_daily, DATE)
    }

    /// The day a key found by [`Self::ranking_daily_pattern`] belongs to, or `None` when the key
    /// is not a daily ranking key (such as the window key itself).
    pub fn ranking_day_of(&self, key: &str) -> Option<NaiveDate> {
        let (before, after) = self.daily_parts();
        let middle = key.strip_prefix(before)?.strip_suffix(after)?;
        // `%Y-%m-%d` alone would accept `2024-1-5`; require the canonical 10 characters.
        (middle.len() == 10)
            .then(|| NaiveDate::parse_from_str(middle, DATE_FORMAT).ok())
            .flatten()
    }

    fn daily_parts(&self) -> (&str, &str) {
        self.ranking_daily
            .split_once(DATE)
            .unwrap_or((self.ranking_daily.as_str(), ""))
    }

    /// The lock that keeps replicas from rebuilding the ranking at the same time.
    pub fn ranking_lock(&self) -> String {
        format!("{}:lock", self.ranking_window)
    }

    /// A HASH recording which rebuild the live ranking came from (`day`, `token`, `built_at`),
    /// written by the swap script in the same atomic step as the swap. It lives in the ranking
    /// key's cluster slot, so the script can touch both.
    pub fn ranking_live_record(&self) -> String {
        self.in_ranking_slot("live")
    }

    /// A SCAN `MATCH` pattern finding every coupon's outbox in the per-coupon layout (and
    /// possibly other keys, which [`Self::coupon_of_outbox`] rejects).
    pub fn outbox_pattern(&self) -> String {
        scan_pattern(&self.outbox, COUPON_ID)
    }

    /// The coupon whose outbox `key` is, in the per-coupon layout.
    pub fn coupon_of_outbox(&self, key: &str) -> Option<i64> {
        coupon_in(&self.outbox, key)
    }

    /// A SCAN `MATCH` pattern finding every coupon's `<outbox>:dead` stream in the per-coupon
    /// layout (and possibly other keys, which [`Self::coupon_of_outbox_dead`] rejects).
    pub fn outbox_dead_pattern(&self) -> String {
        scan_pattern(&format!("{}:dead", self.outbox), COUPON_ID)
    }

    /// The coupon whose `<outbox>:dead` stream `key` is, in the per-coupon layout.
    pub fn coupon_of_outbox_dead(&self, key: &str) -> Option<i64> {
        coupon_in(&format!("{}:dead", self.outbox), key)
    }

    /// A SCAN `MATCH` pattern finding every coupon's ranking-log stream in the per-coupon layout
    /// (and possibly other keys, which [`Self::coupon_of_log`] rejects).
    pub fn log_pattern(&self) -> String {
        scan_pattern(&self.log, COUPON_ID)
    }

    /// The coupon whose ranking-log stream `key` is, in the per-coupon layout.
    pub fn coupon_of_log(&self, key: &str) -> Option<i64> {
        coupon_in(&self.log, key)
    }

    /// The reconciliation marker of a lane (these templates resolved by [`Self::for_coupon`]):
    /// the identity of the Redis last reconciled from MySQL for this outbox. Beside the outbox,
    /// in its hash slot, so the decide script can read it on Redis Cluster.
    pub fn reconciled_marker(&self) -> String {
        format!("{}:reconciled", self.outbox)
    }

    /// HASH of pause flags every replica honours: field `drain` or `persist`, value a JSON
    /// record of who paused it and when.
    pub fn pause_flags(&self) -> String {
        format!("{}:pause", self.control)
    }

    /// HASH of job run records: field `<job>` (the last run) and `<job>:ok` (the last
    /// successful run), each a JSON record written by whichever replica ran it.
    pub fn job_runs(&self) -> String {
        format!("{}:jobs", self.control)
    }

    /// A replica's heartbeat (a JSON record with a TTL), refreshed while it runs.
    pub fn replica_heartbeat(&self, replica: &str) -> String {
        format!("{}:replica:{replica}", self.control)
    }

    /// A SCAN `MATCH` pattern for every replica's heartbeat.
    pub fn replica_heartbeat_pattern(&self) -> String {
        format!("{}:replica:*", glob_escape(&self.control))
    }

    /// A temporary key for one rebuild; `token` makes it unique to that rebuild. It hashes to
    /// the ranking key's cluster slot even when `ranking_window` has no hash tag (the whole key
    /// then becomes the tag), so the swap script's RENAME works on Redis Cluster.
    pub fn ranking_temp(&self, token: &str) -> String {
        self.in_ranking_slot(&format!("tmp:{token}"))
    }

    /// `ranking_window` + `:suffix`, in the ranking key's cluster slot.
    fn in_ranking_slot(&self, suffix: &str) -> String {
        if hash_tag(&self.ranking_window).len() < self.ranking_window.len() {
            format!("{}:{suffix}", self.ranking_window)
        } else {
            format!("{{{}}}:{suffix}", self.ranking_window)
        }
    }

    /// Whether the window's daily keys and the rebuild's temporary key share a cluster slot,
    /// so that one ZUNIONSTORE can sum them on Redis Cluster.
    pub fn ranking_in_one_slot(&self) -> bool {
        let day =
            |d: u32| self.ranking_day(NaiveDate::from_ymd_opt(2024, 1, d).unwrap_or_default());
        let temp = self.ranking_temp("x");
        hash_tag(&day(1)) == hash_tag(&temp) && hash_tag(&day(2)) == hash_tag(&temp)
    }

    /// Whether each coupon has its own queue, dead-letter stream and outbox (`{couponId}` in
    /// the `queue` template), found through `coupon_registry`.
    pub fn per_coupon(&self) -> bool {
        self.queue.contains(COUPON_ID)
    }

    /// The keys of one coupon's lane in the per-coupon layout: `queue`, `dead`, `outbox` and `log`
    /// resolved for `coupon_id`. (In the single-queue layout, the same templates.)
    pub fn for_coupon(&self, coupon_id: i64) -> Self {
        let mut out = self.clone();
        for template in [&mut out.queue, &mut out.dead, &mut out.outbox, &mut out.log] {
            *template = Self::coupon_key(template, coupon_id);
        }
        out
    }

    /// Why these templates cannot work on Redis Cluster, as `(template name, message)`: the
    /// decide script touches a queue, its dead-letter stream and outbox and the keys of every
    /// coupon in it at once, so they must share one hash tag — one for everything in the
    /// single-queue layout, one per coupon in the per-coupon layout. (The ranking needs none:
    /// without one it is built in chunks.)
    pub fn cluster_problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        for coupon_id in [1, 2] {
            let queue = Self::coupon_key(&self.queue, coupon_id);
            let anchor = hash_tag(&queue);
            if anchor.len() == queue.len() {
                return vec![(
                    "queue",
                    format!(
                        "`{}` has no hash tag: on Redis Cluster a queue and its coupons' keys must share one, e.g. `{{coupon}}:queue` with `{{coupon}}:stock:{{couponId}}`, or per coupon `{{coupon:{{couponId}}}}:queue` with `{{coupon:{{couponId}}}}:stock`",
                        self.queue
                    ),
                )];
            }
            // Templates without `{couponId}` (dead, outbox in the single-queue layout) resolve
            // to themselves.
            for (name, template) in self.entries() {
                if matches!(
                    name,
                    "queue"
                        | "coupon_registry"
                        | "ranking_daily"
                        | "ranking_window"
                        | "control"
                        | "coupon_active"
                ) {
                    continue;
                }
                let key = Self::coupon_key(template, coupon_id);
                if hash_tag(&key) != anchor && !problems.iter().any(|(n, _)| *n == name) {
                    problems.push((
                        name,
                        format!(
                            "`{template}` is not in its queue's hash slot: on Redis Cluster it must carry the queue's hash tag (`{{{anchor}}}` for coupon {coupon_id})"
                        ),
                    ));
                }
            }
        }
        problems
    }
}

/// The part of `key` Redis Cluster hashes: the text of the first non-empty `{...}`, or the whole
/// key.
pub fn hash_tag(key: &str) -> &str {
    if let Some(open) = key.find('{')
        && let Some(len) = key[open + 1..].find('}')
        && len > 0
    {
        return &key[open + 1..open + 1 + len];
    }
    key
}

/// A SCAN `MATCH` pattern for every key of `template`: its `placeholder` as `*`, the rest
/// escaped (a template without the placeholder gives the template followed by `*`).
fn scan_pattern(template: &str, placeholder: &str) -> String {
    let (before, after) = template.split_once(placeholder).unwrap_or((template, ""));
    format!("{}*{}", glob_escape(before), glob_escape(after))
}

/// The coupon a key of the per-coupon `template` names (`None`: not such a key).
fn coupon_in(template: &str, key: &str) -> Option<i64> {
    let (before, after) = template.split_once(COUPON_ID)?;
    parse_id(key.strip_prefix(before)?.strip_suffix(after)?)
}

/// Escapes the characters Redis glob patterns treat specially.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_tags_follow_the_redis_cluster_rule() {
        assert_eq!(hash_tag("{coupon}:queue"), "coupon");
        assert_eq!(hash_tag("pfx:{coupon}:stock:42"), "coupon");
        assert_eq!(hash_tag("coupon:queue"), "coupon:queue");
        assert_eq!(
            hash_tag("{}:queue"),
            "{}:queue",
            "an empty tag hashes the whole key"
        );
        assert_eq!(hash_tag("a{b"), "a{b");
        assert_eq!(hash_tag("{a}{b}"), "a", "only the first tag counts");
    }

    #[test]
    fn the_rebuilds_temporary_key_always_shares_the_rankings_slot() {
        let plain = KeyTemplates::default();
        assert_eq!(plain.ranking_temp("t"), "{product:ranking:3d}:tmp:t");
        assert_eq!(
            hash_tag(&plain.ranking_temp("t")),
            hash_tag(&plain.ranking_window)
        );
        let tagged = KeyTemplates {
            ranking_window: "{rank}:3d".into(),
            ranking_daily: "{rank}:{date}".into(),
            ..KeyTemplates::default()
        };
        assert_eq!(tagged.ranking_temp("t"), "{rank}:3d:tmp:t");
        assert!(tagged.ranking_in_one_slot());
        assert!(
            !plain.ranking_in_one_slot(),
            "untagged daily keys spread over slots"
        );
    }

    #[test]
    fn cluster_problems_name_every_coupon_template_outside_the_queues_slot() {
        let plain = KeyTemplates::default();
        let problems = plain.cluster_problems();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].0, "queue");
        assert!(problems[0].1.contains("{coupon}:queue"));

        let mut tagged = KeyTemplates::single_slot_layout();
        assert!(tagged.cluster_problems().is_empty());
        assert!(tagged.with_prefix("test:").cluster_problems().is_empty());
        tagged.stock = "coupon:stock:{couponId}".into();
        tagged.outbox = "{other}:outbox".into();
        let names: Vec<&str> = tagged.cluster_problems().iter().map(|p| p.0).collect();
        assert_eq!(names, vec!["stock", "outbox"]);
    }

    #[test]
    fn the_per_coupon_layout_puts_each_coupons_lane_in_its_own_slot() {
        let per_coupon = KeyTemplates::per_coupon_layout();
        assert!(per_coupon.per_coupon());
        assert!(
            per_coupon.validate().is_empty(),
            "{:?}",
            per_coupon.validate()
        );
        assert!(per_coupon.cluster_problems().is_empty());
        let lane = per_coupon.for_coupon(42);
        assert_eq!(lane.queue, "{coupon:42}:queue");
        assert_eq!(lane.outbox, "{coupon:42}:outbox");
        assert_eq!(hash_tag(&lane.stock(42)), "coupon:42");
        assert_ne!(
            hash_tag(&per_coupon.for_coupon(1).queue),
            hash_tag(&per_coupon.for_coupon(2).queue)
        );

        // A per-coupon queue with a shared dead-letter stream cannot work.
        let broken = KeyTemplates {
            dead: "coupon:dead".into(),
            ..per_coupon.clone()
        };
        assert!(broken.validate().iter().any(|(name, _)| *name == "dead"));
        // A coupon key outside its lane's slot is a cluster problem.
        let off_slot = KeyTemplates {
            stock: "coupon:stock:{couponId}".into(),
            ..per_coupon
        };
        let names: Vec<&str> = off_slot.cluster_problems().iter().map(|p| p.0).collect();
        assert_eq!(names, vec!["stock"]);
    }

    #[test]
    fn outbox_keys_found_by_scan_name_their_coupon_and_nothing_else_does() {
        let keys = KeyTemplates::per_coupon_layout().with_prefix("t*:");
        assert_eq!(keys.outbox_pattern(), "t\\*:{coupon:*}:outbox");
        let outbox = keys.for_coupon(42).outbox;
        assert_eq!(keys.coupon_of_outbox(&outbox), Some(42));
        assert_eq!(keys.coupon_of_outbox(&format!("{outbox}:reconciled")), None);
        assert_eq!(keys.coupon_of_outbox("t*:{coupon:x}:outbox"), None);
        assert_eq!(keys.coupon_of_outbox("t*:{coupon:007}:outbox"), None);
    }

    #[test]
    fn placeholders_are_replaced_and_hash_tags_kept() {
        let keys = KeyTemplates {
            stock: "{coupon}:stock:{couponId}".into(),
            ..KeyTemplates::default()
        };
        assert_eq!(keys.stock(42), "{coupon}:stock:42");
        assert_eq!(KeyTemplates::default().issued(7), "coupon:issued:7");
    }

    #[test]
    fn daily_keys_round_trip_and_other_keys_are_not_days() {
        let keys = KeyTemplates::default().with_prefix("t[1]:");
        let day = NaiveDate::from_ymd_opt(2026, 11, 23).unwrap_or_default();
        let key = keys.ranking_day(day);
        assert_eq!(key, "t[1]:product:ranking:2026-11-23");
        assert_eq!(keys.ranking_day_of(&key), Some(day));
        assert_eq!(keys.ranking_day_of(&keys.ranking_window), None);
        assert_eq!(keys.ranking_day_of("t[1]:product:ranking:2026-1-5"), None);
        assert_eq!(keys.ranking_daily_pattern(), "t\\[1\\]:product:ranking:*");
    }

    #[test]
    fn templates_missing_or_misusing_placeholders_are_rejected() {
        let keys = KeyTemplates {
            stock: "coupon:stock".into(),
            queue: "coupon:queue:{date}".into(),
            dead: "coupon:issued:{couponId}".into(),
            ..KeyTemplates::default()
        };
        let names: Vec<&str> = keys.validate().into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&"stock"), "{names:?}");
        assert!(names.contains(&"queue"), "{names:?}");
        assert!(names.contains(&"dead"), "{names:?}");
        // Per coupon, the queue's dead-letter stream and outbox must be per coupon too.
        let half = KeyTemplates {
            queue: "coupon:queue:{couponId}".into(),
            dead: "coupon:dead:{couponId}".into(),
            ..KeyTemplates::default()
        };
        let names: Vec<&str> = half.validate().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, vec!["outbox", "log"]);
    }
}
