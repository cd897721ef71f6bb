//! A fault-injecting TCP proxy, for the fault tests and the `chaos` nemesis.
//!
//! It sits between the worker and one server (Redis or MySQL) on loopback and forwards bytes
//! both ways until told to misbehave in one of the ways real networks do:
//!
//! - [`FaultProxy::drop_reply_when`]: the next command whose bytes contain a pattern is forwarded
//!   to the server, which runs it, but its reply is swallowed and the client's connection is
//!   closed — "the reply was lost after the server ran the command". Clients that resend on a new
//!   connection (fred does, by default) then run the command twice.
//! - [`FaultProxy::freeze_existing`]: every connection open now stops moving bytes in both
//!   directions without closing — a hung server behind a DNS name, a half-open TCP connection —
//!   while new connections pass. [`FaultProxy::thaw`] lets them go on.
//! - [`FaultProxy::set_blackhole`]: new connections are accepted and then hang.
//! - [`FaultProxy::kill_all`]: every open connection is reset.
//!
//! Each fault is counted ([`FaultProxy::replies_dropped`], …) so a test can check that the fault
//! it meant to inject really happened instead of passing vacuously.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What a connection may do right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flow {
    Forward,
    Frozen,
    Closed,
}

/// One proxied connection, as the proxy's controls see it.
struct Connection {
    flow: watch::Sender<Flow>,
}

#[derive(Default)]
struct Shared {
    /// Byte patterns armed by `drop_reply_when`, each consumed by the first command matching it.
    drop_patterns: Mutex<Vec<Vec<u8>>>,
    connections: Mutex<Vec<Connection>>,
    blackhole: AtomicBool,
    accepted: AtomicU64,
    replies_dropped: AtomicU64,
    frozen: AtomicU64,
}

impl Shared {
    fn lock_connections(&self) -> std::sync::MutexGuard<'_, Vec<Connection>> {
        // A panic while holding this lock cannot leave the list inconsistent (pushes and retains
        // only), so a poisoned lock is still usable.
        self.connections
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Consumes the first armed pattern that `chunk` contains, if any.
    fn take_matching_pattern(&self, chunk: &[u8]) -> bool {
        let mut patterns = self
            .drop_patterns
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let found = patterns.iter().position(|pattern| contains(chunk, pattern));
        match found {
            Some(index) => {
                patterns.remove(index);
                true
            }
            None => false,
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty()
        || haystack
            .windows(needle.len())
            .any(|window| window == needle)
}

/// A running proxy; dropping it (or [`FaultProxy::stop`]) closes the listener and every
/// connection.
pub struct FaultProxy {
    listen: SocketAddr,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("fault proxy: binding a loopback port")?;
        let listen = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        tasks.spawn(accept_loop(
            listener,
            upstream,
            Arc::clone(&shared),
            stop.clone(),
            tasks.clone(),
        ));
        Ok(Self {
            listen,
            upstream,
            shared,
            stop,
            tasks,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.listen
    }

    /// The server behind the proxy.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Arms a lost reply: the next command (a chunk of client bytes) containing `pattern` is
    /// forwarded, the server's reply to it is swallowed and the client's connection closed.
    /// Several calls arm several faults.
    pub fn drop_reply_when(&self, pattern: impl AsRef<[u8]>) {
        self.shared
            .drop_patterns
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(pattern.as_ref().to_vec());
    }

    /// Patterns armed by [`FaultProxy::drop_reply_when`] that no command has matched yet.
    pub fn armed_drops(&self) -> usize {
        self.shared
            .drop_patterns
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .len()
    }

    /// Every connection open now stops moving bytes (without closing) until [`Self::thaw`];
    /// connections opened later pass. Returns how many were frozen.
    pub fn freeze_existing(&self) -> usize {
        let connections = self.shared.lock_connections();
        let mut frozen = 0;
        for connection in connections.iter() {
            let changed = connection.flow.send_if_modified(|flow| {
                if *flow == Flow::Forward {
                    *flow = Flow::Frozen;
                    true
                } else {
                    false
                }
            });
            if changed {
                frozen += 1;
            }
        }
        self.shared.frozen.fetch_add(frozen, Ordering::Relaxed);
        frozen as usize
    }

    /// Frozen connections move bytes again (unless their client gave up and closed them).
    pub fn thaw(&self) {
        for connection in self.shared.lock_connections().iter() {
            connection.flow.send_if_modified(|flow| {
                if *flow == Flow::Frozen {
                    *flow = Flow::Forward;
                    true
                } else {
                    false
                }
            });
        }
    }

    /// While on, new connections are accepted and then hang without reaching the server.
    pub fn set_blackhole(&self, on: bool) {
        self.shared.blackhole.store(on, Ordering::Relaxed);
    }

    /// Resets every open connection.
    pub fn kill_all(&self) {
        for connection in self.shared.lock_connections().iter() {
            connection.flow.send_replace(Flow::Closed);
        }
    }

    /// Connections accepted so far.
    pub fn connections_accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Replies swallowed by [`Self::drop_reply_when`] faults so far.
    pub fn replies_dropped(&self) -> u64 {
        self.shared.replies_dropped.load(Ordering::Relaxed)
    }

    /// Connections frozen by [`Self::freeze_existing`] so far.
    pub fn connections_frozen(&self) -> u64 {
        self.shared.frozen.load(Ordering::Relaxed)
    }

    /// Closes the listener and every connection, and waits for the proxy's tasks.
    pub async fn stop(self) {
        self.stop.cancel();
        self.kill_all();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.kill_all();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((client, _)) = accepted else {
            // Out of file descriptors and the like: the next accept may work.
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        let (flow, flow_rx) = watch::channel(if shared.blackhole.load(Ordering::Relaxed) {
            Flow::Frozen
        } else {
            Flow::Forward
        });
        {
            let mut connections = shared.lock_connections();
            connections.retain(|connection| *connection.flow.borrow() != Flow::Closed);
            connections.push(Connection { flow });
        }
        tasks.spawn(proxy_connection(
            client,
            upstream,
            Arc::clone(&shared),
            flow_rx,
            stop.clone(),
        ));
    }
}

async fn proxy_connection(
    client: TcpStream,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    flow: watch::Receiver<Flow>,
    stop: CancellationToken,
) {
    // A blackholed connection hangs before it even reaches the server.
    let mut gate = flow.clone();
    if gate.wait_for(|f| *f != Flow::Frozen).await.is_err() || *gate.borrow() == Flow::Closed {
        return;
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return; // the server is down: the client sees its connection closed, as it would.
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    // Set by the client-to-server pump when it forwarded a command whose reply must be lost.
    let doomed = Arc::new(AtomicBool::new(false));
    let to_server = pump(
        client_read,
        server_write,
        flow.clone(),
        Direction::ToServer {
            shared: Arc::clone(&shared),
            doomed: Arc::clone(&doomed),
        },
    );
    let to_client = pump(
        server_read,
        client_write,
        flow,
        Direction::ToClient { shared, doomed },
    );
    tokio::select! {
        () = stop.cancelled() => {}
        _ = to_server => {}
        _ = to_client => {}
    }
}

enum Direction {
    ToServer {
        shared: Arc<Shared>,
        doomed: Arc<AtomicBool>,
    },
    ToClient {
        shared: Arc<Shared>,
        doomed: Arc<AtomicBool>,
    },
}

/// Copies bytes one way until either side closes, the connection is closed by a control, or a
/// lost-reply fault ends it. Returns when the connection should end (both halves are dropped by
/// the caller, which closes both sockets).
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut flow: watch::Receiver<Flow>,
    direction: Direction,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            _ = flow.wait_for(|f| *f == Flow::Closed) => return,
        };
        let n = match read {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // A frozen connection holds what it read until thawed or closed.
        match flow.wait_for(|f| *f != Flow::Frozen).await {
            Ok(f) if *f == Flow::Forward => {}
            _ => return,
        }
        let chunk = &buffer[..n];
        match &direction {
            Direction::ToServer { shared, doomed } => {
                if shared.take_matching_pattern(chunk) {
                    doomed.store(true, Ordering::SeqCst);
                }
            }
            Direction::ToClient { shared, doomed } => {
                if doomed.load(Ordering::SeqCst) {
                    // The server ran the command and answered; the client never hears of it.
                    shared.replies_dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
        if to.write_all(chunk).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// An upstream that answers every chunk with `ok:` + the chunk.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buffer = [0u8; 1024];
                    while let Ok(n) = socket.read(&mut buffer).await {
                        if n == 0 {
                            return;
                        }
                        let mut reply = b"ok:".to_vec();
                        reply.extend_from_slice(&buffer[..n]);
                        if socket.write_all(&reply).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn round_trip(stream: &mut TcpStream, message: &[u8]) -> std::io::Result<Vec<u8>> {
        stream.write_all(message).await?;
        let mut buffer = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer))
            .await
            .map_err(|_| std::io::Error::other("no reply within 5 s"))??;
        Ok(buffer[..n].to_vec())
    }

    #[tokio::test]
    async fn bytes_pass_through_both_ways() {
        let proxy = FaultProxy::start(echo_server().await).await.unwrap();
        let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut client, b"PING").await.unwrap(), b"ok:PING");
        assert_eq!(proxy.connections_accepted(), 1);
    }

    #[tokio::test]
    async fn an_armed_pattern_loses_exactly_that_reply_and_closes_the_connection() {
        let proxy = FaultProxy::start(echo_server().await).await.unwrap();
        proxy.drop_reply_when("COMMIT");
        let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(
            round_trip(&mut client, b"SELECT").await.unwrap(),
            b"ok:SELECT"
        );
        let lost = round_trip(&mut client, b"COMMIT").await;
        assert!(
            matches!(&lost, Ok(bytes) if bytes.is_empty()) || lost.is_err(),
            "the reply to COMMIT must not arrive: {lost:?}"
        );
        assert_eq!(proxy.replies_dropped(), 1);
        assert_eq!(proxy.armed_drops(), 0);
        // The fault is consumed: a new connection gets its replies again.
        let mut again = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(
            round_trip(&mut again, b"COMMIT").await.unwrap(),
            b"ok:COMMIT"
        );
    }

    #[tokio::test]
    async fn frozen_connections_hang_while_new_ones_pass_and_thaw_resumes_them() {
        let proxy = FaultProxy::start(echo_server().await).await.unwrap();
        let mut old = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut old, b"a").await.unwrap(), b"ok:a");
        assert_eq!(proxy.freeze_existing(), 1);
        old.write_all(b"b").await.unwrap();
        let mut buffer = [0u8; 16];
        let hung = tokio::time::timeout(Duration::from_millis(300), old.read(&mut buffer)).await;
        assert!(hung.is_err(), "a frozen connection must not answer");
        let mut new = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut new, b"c").await.unwrap(), b"ok:c");
        proxy.thaw();
        let n = tokio::time::timeout(Duration::from_secs(5), old.read(&mut buffer))
            .await
            .expect("a thawed connection answers")
            .unwrap();
        assert_eq!(&buffer[..n], b"ok:b");
    }

    #[tokio::test]
    async fn kill_all_resets_open_connections() {
        let proxy = FaultProxy::start(echo_server().await).await.unwrap();
        let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut client, b"x").await.unwrap(), b"ok:x");
        proxy.kill_all();
        let after = round_trip(&mut client, b"y").await;
        assert!(
            matches!(&after, Ok(bytes) if bytes.is_empty()) || after.is_err(),
            "a killed connection must not answer: {after:?}"
        );
    }

    #[tokio::test]
    async fn a_blackholed_connection_never_reaches_the_server() {
        let proxy = FaultProxy::start(echo_server().await).await.unwrap();
        proxy.set_blackhole(true);
        let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
        client.write_all(b"z").await.unwrap();
        let mut buffer = [0u8; 16];
        let hung = tokio::time::timeout(Duration::from_millis(300), client.read(&mut buffer)).await;
        assert!(hung.is_err(), "a blackholed connection must hang");
    }
}
