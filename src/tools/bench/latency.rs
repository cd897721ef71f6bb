//! `bench latency` (issue 14): enqueue-to-outcome time as a shopper sees it, against the real
//! daemon (`app::run`, in-process, in a sandbox), with following on and, in the same run, off.
//!
//! The benchmark plays the API: a request is `ZADD NX <queue> <now ms> <userId>:1`, and its
//! outcome is read with `HGET <result> <userId>` — asked again for every request still waiting,
//! round after round (each round's requests are sent together, as many API instances would);
//! a request's latency is from its ZADD to the first round that saw its outcome, so a round's
//! length is the resolution. Scenarios, in order: a lone request on an idle queue (five times),
//! steady rates for a few seconds each, and a burst enqueued at once (its figure is the decided
//! rate: requests over the time from the burst to its last outcome).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use fred::prelude::*;

use super::in_sandbox;
use crate::config::Config;
use crate::tools::options::LatencyBenchOptions;
use crate::tools::report::{Latencies, group, millis, rate};
use crate::tools::sandbox::Sandbox;

/// Time between rounds of HGETs for the requests still waiting.
const ROUND_PAUSE: Duration = Duration::from_millis(1);
/// HGETs sent together at most (fred pipelines them).
const ROUND_CHUNK: usize = 2000;

/// One scenario's figures.
#[derive(Debug, Clone, Default)]
struct Figures {
    latencies: Latencies,
    /// Requests over the time until the last outcome (bursts).
    decided_rate: f64,
}

pub(crate) async fn run(config: &Config, options: &LatencyBenchOptions) -> anyhow::Result<()> {
    let poll_ms = if config.coupon.poll_interval.is_zero() {
        30
    } else {
        config.coupon.poll_interval.as_millis() as u64
    };
    println!(
        "latency: following every {poll_ms} ms vs following off (`[coupon] schedule` {} only)",
        config.coupon.schedule.as_str()
    );
    let on = measure(config, options, Duration::from_millis(poll_ms)).await?;
    let off = if options.skip_off {
        None
    } else {
        Some(measure(config, options, Duration::ZERO).await?)
    };
    println!(
        "  scenario                      following on: p50 / p99 / max          following off: p50 / p99 / max        p99 off/on"
    );
    for (index, (name, on)) in on.iter().enumerate() {
        let off = off.as_ref().and_then(|off| off.get(index)).map(|(_, f)| f);
        let show = |f: &Figures| {
            if f.decided_rate > 0.0 {
                format!(
                    "{} decided/s, last after {}",
                    group(f.decided_rate),
                    millis(f.latencies.max())
                )
            } else {
                format!(
                    "{} / {} / {}",
                    millis(f.latencies.percentile(50.0)),
                    millis(f.latencies.percentile(99.0)),
                    millis(f.latencies.max())
                )
            }
        };
        let ratio = off.map_or("-".to_owned(), |off| {
            format!(
                "{:.0}x",
                off.latencies.percentile(99.0).as_secs_f64()
                    / on.latencies.percentile(99.0).as_secs_f64().max(1e-6)
            )
        });
        println!(
            "  {name:<29} {:<40} {:<40} {ratio}",
            show(on),
            off.map_or("-".to_owned(), show)
        );
    }
    Ok(())
}

/// Every scenario against one daemon configured with `poll_interval` (zero: following off).
async fn measure(
    config: &Config,
    options: &LatencyBenchOptions,
    poll_interval: Duration,
) -> anyhow::Result<Vec<(String, Figures)>> {
    in_sandbox(config, async |sandbox| {
        let mut daemon_config = sandbox.config.clone();
        daemon_config.coupon.poll_interval = poll_interval;
        daemon_config.http.listen = "127.0.0.1:0".parse()?;
        let total = 5
            + options
                .rates
                .iter()
                .map(|r| r * options.seconds)
                .sum::<u64>()
            + options.burst;
        let _: () = sandbox
            .redis
            .set(sandbox.config.keys.stock(1), total, None, None, false)
            .await?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let daemon = tokio::spawn(crate::app::run(daemon_config, async move {
            let _ = stopped.await;
        }));
        let result = scenarios(sandbox, options).await;
        let _ = stop.send(());
        daemon.await??;
        result
    })
    .await
}

async fn scenarios(
    sandbox: &Sandbox,
    options: &LatencyBenchOptions,
) -> anyhow::Result<Vec<(String, Figures)>> {
    let mut user = 0i64;
    let mut out = Vec::new();
    // Let the daemon start (and take the follow lease) before measuring.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut lone = Latencies::default();
    for _ in 0..5 {
        user += 1;
        let figures = drive(sandbox, &mut user, 1, 1).await?;
        lone.record(figures.latencies.max());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    out.push((
        "lone request (5 times)".to_owned(),
        Figures {
            latencies: lone,
            decided_rate: 0.0,
        },
    ));
    for &per_second in &options.rates {
        let figures = drive(sandbox, &mut user, per_second, per_second * options.seconds).await?;
        out.push((
            format!(
                "steady {} req/s x {} s",
                group(per_second as f64),
                options.seconds
            ),
            figures,
        ));
    }
    if options.burst > 0 {
        out.push((
            format!("burst of {}", group(options.burst as f64)),
            burst(sandbox, &mut user, options.burst).await?,
        ));
    }
    Ok(out)
}

/// Enqueues `n` requests for coupon 1 as the API does, one per user from `*user` on, scored
/// now, and moves `*user` past them. Returns the first of those users.
async fn enqueue(sandbox: &Sandbox, user: &mut i64, n: u64) -> anyhow::Result<i64> {
    let first = *user;
    let now_ms = chrono::Utc::now().timestamp_millis() as f64;
    let members: Vec<(f64, String)> = (0..n)
        .map(|i| (now_ms, format!("{}:1", first + i as i64)))
        .collect();
    let _: u64 = sandbox
        .redis
        .zadd(
            &sandbox.config.keys.queue,
            Some(SetOptions::NX),
            None,
            false,
            false,
            members,
        )
        .await?;
    *user += n as i64;
    Ok(first)
}

/// Enqueues `count` requests at once and waits until the result hash holds an outcome for each
/// (one HLEN per round: asking for each of them would load the Redis being measured); the
/// figure is the time to the last outcome and the decided rate it gives.
async fn burst(sandbox: &Sandbox, user: &mut i64, count: u64) -> anyhow::Result<Figures> {
    let keys = &sandbox.config.keys;
    let redis = &sandbox.redis;
    let result_key = keys.result(1);
    let before: u64 = redis.hlen(&result_key).await?;
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < count {
        let n = (count - sent).min(5000);
        enqueue(sandbox, user, n).await?;
        sent += n;
    }
    loop {
        let decided: u64 = redis.hlen(&result_key).await?;
        if decided >= before + count {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(300),
            "burst: {} of {count} decided after 300 s",
            decided - before
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed();
    let mut latencies = Latencies::default();
    latencies.record(elapsed);
    Ok(Figures {
        latencies,
        decided_rate: rate(count, elapsed),
    })
}

/// Enqueues `count` requests at `per_second` (0: all at once), in steps of one millisecond's
/// share, and reads outcomes until every one is decided. Returns the latencies.
async fn drive(
    sandbox: &Sandbox,
    user: &mut i64,
    per_second: u64,
    count: u64,
) -> anyhow::Result<Figures> {
    let keys = &sandbox.config.keys;
    let redis = &sandbox.redis;
    let result_key = keys.result(1);
    let started = Instant::now();
    let mut sent = 0u64;
    let mut waiting: VecDeque<(i64, Instant)> = VecDeque::new();
    let mut latencies = Latencies::default();
    let deadline = Duration::from_secs(120);
    while sent < count || !waiting.is_empty() {
        anyhow::ensure!(
            started.elapsed() < deadline + Duration::from_secs(count / per_second.max(1)),
            "{} requests still without an outcome after {:?}",
            waiting.len(),
            started.elapsed()
        );
        // Send what is due by now.
        let due = if per_second == 0 {
            count
        } else {
            (started.elapsed().as_secs_f64() * per_second as f64) as u64
        }
        .min(count);
        while sent < due {
            let n = (due - sent).min(5000);
            let at = Instant::now();
            let first = enqueue(sandbox, user, n).await?;
            waiting.extend((first..first + n as i64).map(|u| (u, at)));
            sent += n;
        }
        // One round of HGETs for the requests still waiting.
        let mut still = VecDeque::with_capacity(waiting.len());
        let batch: Vec<(i64, Instant)> = waiting.drain(..).collect();
        for chunk in batch.chunks(ROUND_CHUNK) {
            let answers = futures_util::future::try_join_all(
                chunk
                    .iter()
                    .map(|(u, _)| redis.hget::<Option<String>, _, _>(&result_key, *u)),
            )
            .await?;
            let seen = Instant::now();
            for ((u, at), answer) in chunk.iter().zip(answers) {
                match answer {
                    Some(_) => latencies.record(seen - *at),
                    None => still.push_back((*u, *at)),
                }
            }
        }
        waiting = still;
        tokio::time::sleep(ROUND_PAUSE).await;
    }
    Ok(Figures {
        latencies,
        decided_rate: 0.0,
    })
}
