//! The HTTP endpoints for Kubernetes and Prometheus (docs/contract.md §7):
//! `/healthz` (the process and its scheduler are alive), `/readyz` (Redis and MySQL answer now;
//! a paused worker is still ready) and `/metrics` (OpenMetrics when asked for, else the
//! Prometheus text format).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use fred::prelude::*;
use sqlx::MySqlPool;
use tokio::net::TcpListener;

use crate::metrics::Metrics;

/// How long `/readyz` waits for each backend.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// `/healthz` turns 503 when the scheduler has not beaten for this long.
pub(crate) const LIVENESS_TIMEOUT: Duration = Duration::from_secs(30);

/// The scheduler's heartbeat: a job the scheduler itself fires every second beats it (and pings
/// the systemd watchdog in the same run), so `/healthz` and the watchdog see the same signal: if
/// the scheduler's loop stops, both notice.
#[derive(Clone, Debug)]
pub(crate) struct Liveness(Arc<AtomicI64>);

impl Default for Liveness {
    fn default() -> Self {
        let liveness = Self(Arc::new(AtomicI64::new(0)));
        liveness.beat();
        liveness
    }
}

impl Liveness {
    pub(crate) fn beat(&self) {
        self.0
            .store(chrono::Utc::now().timestamp_millis(), Ordering::Relaxed);
    }

    /// How long since the last beat.
    pub(crate) fn silent_for(&self) -> Duration {
        let since = chrono::Utc::now().timestamp_millis() - self.0.load(Ordering::Relaxed);
        Duration::from_millis(since.max(0) as u64)
    }
}

#[derive(Clone)]
pub(crate) struct HttpState {
    pub redis: Client,
    pub mysql: MySqlPool,
    pub metrics: Metrics,
    pub liveness: Liveness,
}

pub(crate) fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Serves until `shutdown` completes.
pub(crate) async fn serve(
    listener: TcpListener,
    state: HttpState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn healthz(State(state): State<HttpState>) -> impl IntoResponse {
    let silent = state.liveness.silent_for();
    if silent > LIVENESS_TIMEOUT {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("scheduler silent for {}s\n", silent.as_secs()),
        )
    } else {
        (StatusCode::OK, "ok\n".to_owned())
    }
}

async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
    let redis = tokio::time::timeout(PROBE_TIMEOUT, state.redis.ping::<String>(None)).await;
    // Under the probe's deadline, and a connection that hangs is closed, not pooled again.
    let mysql = crate::mysql::with_deadline(&state.mysql, PROBE_TIMEOUT, |conn| {
        Box::pin(async move {
            Ok(sqlx::query_scalar::<_, i32>("SELECT 1")
                .fetch_one(&mut *conn)
                .await?)
        })
    })
    .await;
    let redis_ok = matches!(redis, Ok(Ok(_)));
    let mysql_ok = mysql.is_ok();
    let body = format!(
        "redis: {}\nmysql: {}\n",
        if redis_ok { "ok" } else { "unavailable" },
        if mysql_ok { "ok" } else { "unavailable" }
    );
    state.metrics.ready.set(i64::from(redis_ok && mysql_ok));
    let status = if redis_ok && mysql_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body)
}

/// The exposition formats `/metrics` serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exposition {
    OpenMetrics,
    Text,
}

/// Picks the format for an `Accept` header (RFC 9110 §12.5.1): each format's quality is the `q`
/// of the most specific range that matches it (`type/subtype` over `type/*` over `*/*`; 1 when
/// unstated), the highest non-zero quality wins, OpenMetrics on a tie. `q=0` means "not
/// acceptable": `None` when neither format is acceptable (the caller answers 406). No header
/// at all accepts anything (the text format: `curl`, `promtool`).
fn negotiate(accept: Option<&str>) -> Option<Exposition> {
    let Some(accept) = accept.filter(|a| !a.trim().is_empty()) else {
        return Some(Exposition::Text);
    };
    // (specificity, quality) of the best match so far, per format.
    let mut open: Option<(u8, f32)> = None;
    let mut text: Option<(u8, f32)> = None;
    for range in accept.split(',') {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let mut q = 1.0f32;
        for param in parts {
            if let Some((name, value)) = param.split_once('=')
                && name.trim().eq_ignore_ascii_case("q")
            {
                // An unreadable q is treated as 0 (not acceptable), never as 1.
                q = value.trim().parse::<f32>().unwrap_or(0.0).clamp(0.0, 1.0);
            }
        }
        let specificity = |wanted: &str| -> Option<u8> {
            let (kind, _) = wanted.split_once('/')?;
            if media == wanted {
                Some(2)
            } else if media == format!("{kind}/*") {
                Some(1)
            } else if media == "*/*" {
                Some(0)
            } else {
                None
            }
        };
        for (wanted, best) in [
            ("application/openmetrics-text", &mut open),
            ("text/plain", &mut text),
        ] {
            if let Some(level) = specificity(wanted) {
                // The most specific range decides; among equally specific ones (two versions of
                // the type), the highest q.
                let better = match *best {
                    None => true,
                    Some((l, bq)) => level > l || (level == l && q > bq),
                };
                if better {
                    *best = Some((level, q));
                }
            }
        }
    }
    let open = open.map_or(0.0, |(_, q)| q);
    let text = text.map_or(0.0, |(_, q)| q);
    if open <= 0.0 && text <= 0.0 {
        None
    } else if open >= text {
        Some(Exposition::OpenMetrics)
    } else {
        Some(Exposition::Text)
    }
}

/// OpenMetrics for a client that prefers it (Prometheus asks for it first), the Prometheus text
/// format for one that prefers text (`curl`, `promtool check metrics`), 406 when the `Accept`
/// header refuses both (`q=0`).
async fn metrics(
    State(state): State<HttpState>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    let accept = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",");
    let accept = headers
        .contains_key(header::ACCEPT)
        .then_some(accept.as_str());
    match negotiate(accept) {
        Some(Exposition::OpenMetrics) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            state.metrics.encode(),
        )
            .into_response(),
        Some(Exposition::Text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            state.metrics.encode_text(),
        )
            .into_response(),
        None => (
            StatusCode::NOT_ACCEPTABLE,
            "406: /metrics is served as application/openmetrics-text or text/plain; the Accept header refuses both\n",
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Serves `state` on a free port and returns the status line and body of `GET path`.
    async fn get(state: HttpState, path: &str) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        let server = tokio::spawn(serve(listener, state, std::future::pending()));
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response).await;
        server.abort();
        response
    }

    fn state(liveness: Liveness) -> HttpState {
        HttpState {
            // Never connected: /healthz must not touch the backends.
            redis: Client::default(),
            mysql: sqlx::mysql::MySqlPoolOptions::new()
                .connect_lazy("mysql://nobody@127.0.0.1:1/none")
                .unwrap(),
            metrics: Metrics::new(),
            liveness,
        }
    }

    #[test]
    fn accept_picks_the_preferred_format_and_q_0_refuses_one() {
        use Exposition::{OpenMetrics, Text};
        // What Prometheus sends.
        let prometheus = "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2";
        assert_eq!(negotiate(Some(prometheus)), Some(OpenMetrics));
        assert_eq!(negotiate(None), Some(Text));
        assert_eq!(negotiate(Some("*/*")), Some(OpenMetrics));
        assert_eq!(negotiate(Some("text/plain")), Some(Text));
        assert_eq!(negotiate(Some("text/*")), Some(Text));
        assert_eq!(
            negotiate(Some("application/openmetrics-text;q=0.2, text/plain;q=0.9")),
            Some(Text)
        );
        // q=0: not acceptable, even where a wildcard would take it.
        assert_eq!(
            negotiate(Some("application/openmetrics-text;q=0, */*")),
            Some(Text)
        );
        assert_eq!(
            negotiate(Some("application/openmetrics-text; q=0.0, text/plain")),
            Some(Text)
        );
        assert_eq!(
            negotiate(Some("text/plain;q=0, application/openmetrics-text")),
            Some(OpenMetrics)
        );
        assert_eq!(negotiate(Some("text/plain;q=0")), None);
        assert_eq!(negotiate(Some("*/*;q=0")), None);
        assert_eq!(negotiate(Some("application/json")), None);
        assert_eq!(
            negotiate(Some(
                "application/openmetrics-text;q=0, text/plain;q=0, */*;q=1"
            )),
            None
        );
    }

    #[tokio::test]
    async fn metrics_honour_q_0_and_answer_406_when_nothing_offered_is_acceptable() {
        let get_with = async |accept: &str| {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
            let server = tokio::spawn(serve(
                listener,
                state(Liveness::default()),
                std::future::pending(),
            ));
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            let request = format!(
                "GET /metrics HTTP/1.1\r\nHost: t\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
            );
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut response = String::new();
            let _ = stream.read_to_string(&mut response).await;
            server.abort();
            response
        };
        let response = get_with("application/openmetrics-text;q=0, */*").await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.contains("text/plain; version=0.0.4"), "{response}");
        let response = get_with("application/openmetrics-text;q=0, text/plain;q=0").await;
        assert!(response.starts_with("HTTP/1.1 406"), "{response}");
        let response = get_with("application/openmetrics-text").await;
        assert!(
            response.contains("application/openmetrics-text; version=1.0.0"),
            "{response}"
        );
    }

    #[tokio::test]
    async fn healthz_is_ok_while_the_scheduler_beats_and_503_once_it_went_silent() {
        let alive = Liveness::default();
        let response = get(state(alive.clone()), "/healthz").await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");

        let silent = Liveness(Arc::new(AtomicI64::new(
            chrono::Utc::now().timestamp_millis() - 31_000,
        )));
        let response = get(state(silent.clone()), "/healthz").await;
        assert!(response.starts_with("HTTP/1.1 503"), "{response}");
        assert!(response.contains("scheduler silent for 31s"), "{response}");
        silent.beat();
        let response = get(state(silent), "/healthz").await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    }
}
