//! The HTTP endpoints for Kubernetes and Prometheus (docs/contract.md §7):
//! `/healthz` (alive), `/readyz` (Redis and MySQL answer now) and `/metrics`.

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

#[derive(Clone)]
pub(crate) struct HttpState {
    pub redis: Client,
    pub mysql: MySqlPool,
    pub metrics: Metrics,
}

pub(crate) fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
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
    let status = if redis_ok && mysql_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body)
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}
