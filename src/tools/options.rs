//! Every option of the tools' commands (`demo`, `bench …`), declared here once. The binary's
//! command line flattens [`ToolCommand`] into its own subcommands when the `tools` feature is on.

use clap::{Args, Subcommand};

use super::simulated_api::FlashSale;

/// The tools' subcommands.
#[derive(Debug, Subcommand)]
pub enum ToolCommand {
    /// Try the worker end to end: plays the API's part (a flash sale, a few days of orders) in a
    /// private key prefix and database on the configured servers, runs the real jobs with
    /// progress bars, and reports outcomes, latency, the top-10 and the checks it verified.
    Demo(DemoOptions),
    /// Measure the jobs against their targets, in a private key prefix and database on the
    /// configured servers (removed afterwards). Build with --release.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Attack a private deployment (its own Redis, MariaDB and worker replicas, started here) with
    /// seeded random faults during a flash sale, then check every invariant. Needs no config
    /// file. Exits 0 only if every check holds, 1 if one failed, 2 if the run could not complete.
    Chaos(ChaosOptions),
}

/// `demo`: the sale's and the orders' sizes.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct DemoOptions {
    #[arg(long, default_value_t = 3)]
    pub coupons: u64,
    /// Stock of each coupon.
    #[arg(long, default_value_t = 1000)]
    pub stock: u64,
    #[arg(long, default_value_t = 5000)]
    pub users: u64,
    /// Well-formed requests (random users and coupons, so some users ask twice).
    #[arg(long, default_value_t = 20_000)]
    pub requests: u64,
    /// Malformed entries added to the first wave (they are dead-lettered).
    #[arg(long, default_value_t = 6)]
    pub malformed: u64,
    #[arg(long, default_value_t = 500)]
    pub products: u64,
    /// The requests arrive in this many waves, 100 ms apart, while the drain runs.
    #[arg(long, default_value_t = 10)]
    pub waves: u64,
    /// Keep the demo's keys and database afterwards, for a look around.
    #[arg(long)]
    pub keep: bool,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// The coupon drain vs the naive check-then-act algorithm.
    Coupon(CouponBenchOptions),
    /// ZUNIONSTORE vs the chunked rebuild: total time and the longest stall of another client.
    Ranking(RankingBenchOptions),
    /// The ranking-log writer vs a bare multi-row INSERT loop.
    RankingLog(RankingLogBenchOptions),
    /// Enqueue-to-outcome time against the running daemon, following the queue vs not.
    Latency(LatencyBenchOptions),
}

/// `bench latency`: the scenarios, each run with following on and then off.
#[derive(Debug, Clone, Args)]
pub struct LatencyBenchOptions {
    /// Steady request rates (requests per second), each for `--seconds`.
    #[arg(long, value_delimiter = ',', default_values_t = [2_000u64, 20_000])]
    pub rates: Vec<u64>,
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Requests enqueued at once (0 skips the burst).
    #[arg(long, default_value_t = 200_000)]
    pub burst: u64,
    /// Measure following on only (no baseline with following off).
    #[arg(long)]
    pub skip_off: bool,
}

/// `bench coupon`: the sale the drain decides, and the baselines beside it.
#[derive(Debug, Clone, Args)]
pub struct CouponBenchOptions {
    #[arg(long, default_value_t = 1_000_000)]
    pub requests: u64,
    #[arg(long, default_value_t = 10)]
    pub coupons: u64,
    /// Stock of each coupon.
    #[arg(long, default_value_t = 10_000)]
    pub stock: u64,
    /// Requests in the naive algorithm's sale (stock scaled to match); 0 skips it.
    #[arg(long, default_value_t = 1_000_000)]
    pub naive_requests: u64,
    /// Also drain the sale on this Redis Cluster (redis-cluster://…) with one queue per
    /// coupon, and print it beside the single Redis.
    #[arg(long, value_name = "URL")]
    pub cluster_url: Option<String>,
    /// The clean sale, the realistic mix (malformed entries, users asking again, the API
    /// writing while the drain runs), or both one after the other.
    #[arg(long, value_enum, default_value_t = Workload::Both)]
    pub workload: Workload,
    /// Runs of the whole benchmark: each figure is printed for every run, then as the median
    /// and range (min - max) over the runs.
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
    /// Instead: the same sale over 10, 1 000 and 20 000 coupons (single queue) and with 10 and
    /// 20 000 registered coupons, 10 with traffic (per coupon), printing decided/s and ratios.
    #[arg(long)]
    pub catalog: bool,
    /// With `--catalog`: only the drains, not the idle daemon's 30 s measurement after them.
    #[arg(long, requires = "catalog")]
    pub no_idle: bool,
}

/// `bench coupon --workload`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    Clean,
    Realistic,
    Both,
}

impl CouponBenchOptions {
    /// The flash sale these options describe.
    pub fn sale(&self) -> FlashSale {
        FlashSale {
            coupons: self.coupons,
            stock: self.stock,
            requests: self.requests,
        }
    }
}

/// `bench ranking`: the size of the daily sets.
#[derive(Debug, Clone, Copy, Args)]
pub struct RankingBenchOptions {
    /// Products in each daily set.
    #[arg(long, default_value_t = 1_000_000)]
    pub products: u64,
    /// Runs of the whole benchmark: each figure is printed for every run, then as the median
    /// and range (min - max) over the runs.
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
}

/// `bench ranking-log`: how many rows go through the writer.
#[derive(Debug, Clone, Copy, Args)]
pub struct RankingLogBenchOptions {
    #[arg(long, default_value_t = 1_000_000)]
    pub rows: u64,
    /// Runs of the whole benchmark: each figure is printed for every run, then as the median
    /// and range (min - max) over the runs.
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
}

/// `chaos`: the run's length, seed, replicas and fault menu.
#[derive(Debug, Clone, Args)]
pub struct ChaosOptions {
    /// How long the sale and the nemesis run (healing and checking come after).
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Seeds every random choice: the same seed replays the same faults at the same offsets.
    /// Default: a random seed, printed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Worker replicas (child processes running `commerce-worker run`).
    #[arg(long, default_value_t = 3)]
    pub replicas: usize,
    /// The fault menu: `all`, or fault names separated by commas (the menu is printed at the
    /// start of every run).
    #[arg(long, default_value = "all")]
    pub faults: String,
    /// Well-formed coupon requests per second.
    #[arg(long, default_value_t = 100)]
    pub rate: u64,
    /// How long to wait, after healing, for the system to become quiet before checking.
    #[arg(long, default_value_t = 120)]
    pub quiesce_secs: u64,
    /// Keep the run's directory (servers' data, replicas' logs) even when every check passes.
    #[arg(long)]
    pub keep: bool,
    /// Run Redis as a primary, a replica and a Sentinel (the replicas reach Redis through a
    /// `redis-sentinel://` URL) and add `failover` (`SENTINEL FAILOVER`) to the fault menu.
    #[arg(long)]
    pub sentinel: bool,
}
