//! The rendezvous's defence against connection floods: every accepted TCP connection must
//! carry a request with the job's token (checked by `service.rs`'s interceptor, which calls
//! `ConnectionGuard::authenticated`) within `GuardLimits::auth_deadline`, or it is closed;
//! at most `GuardLimits::max_pending` connections may wait for that at once (a new one
//! closes the oldest waiting); an error from `accept` (out of descriptors, say) backs off
//! instead of spinning. Authenticated connections (the workers', the other nodes'
//! launchers') are never touched. `raise_open_file_limit` lifts the descriptor soft limit
//! to the hard one at launcher start.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// How long an unauthenticated connection may live, and how many may wait at once.
#[derive(Debug, Clone, Copy)]
pub struct GuardLimits {
    pub auth_deadline: Duration,
    pub max_pending: usize,
}

impl Default for GuardLimits {
    fn default() -> Self {
        GuardLimits {
            auth_deadline: Duration::from_secs(10),
            max_pending: 4096,
        }
    }
}

/// Backoff after a failed `accept` (EMFILE and the like).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// One accepted connection's standing.
#[derive(Debug)]
struct Standing {
    accepted: Instant,
    authenticated: AtomicBool,
    closed: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Standing {
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        if let Some(waker) = self.waker.lock().unwrap_or_else(|p| p.into_inner()).take() {
            waker.wake();
        }
    }
}

/// The connections the rendezvous has accepted, by peer address.
#[derive(Debug)]
pub struct ConnectionGuard {
    limits: GuardLimits,
    connections: Mutex<HashMap<SocketAddr, Arc<Standing>>>,
}

impl ConnectionGuard {
    pub fn new(limits: GuardLimits) -> Arc<Self> {
        Arc::new(ConnectionGuard {
            limits,
            connections: Mutex::new(HashMap::new()),
        })
    }

    /// Marks the connection from `peer` as carrying the job's token: it stays open.
    pub fn authenticated(&self, peer: Option<SocketAddr>) {
        let Some(peer) = peer else { return };
        if let Some(standing) = self.lock().get(&peer) {
            standing.authenticated.store(true, Ordering::SeqCst);
        }
    }

    /// Connections still waiting for an authenticated request.
    pub fn pending(&self) -> usize {
        self.lock()
            .values()
            .filter(|s| !s.authenticated.load(Ordering::SeqCst))
            .count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Arc<Standing>>> {
        self.connections.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new connection, closing the oldest waiting one when too many wait.
    fn admit(&self, peer: SocketAddr) -> Arc<Standing> {
        let standing = Arc::new(Standing {
            accepted: Instant::now(),
            authenticated: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            waker: Mutex::new(None),
        });
        let mut connections = self.lock();
        let waiting: Vec<&Arc<Standing>> = connections
            .values()
            .filter(|s| !s.authenticated.load(Ordering::SeqCst) && !s.closed.load(Ordering::SeqCst))
            .collect();
        if waiting.len() >= self.limits.max_pending
            && let Some(oldest) = waiting.into_iter().min_by_key(|s| s.accepted)
        {
            oldest.close();
        }
        connections.insert(peer, standing.clone());
        standing
    }

    fn forget(&self, peer: &SocketAddr, standing: &Arc<Standing>) {
        let mut connections = self.lock();
        if connections
            .get(peer)
            .is_some_and(|s| Arc::ptr_eq(s, standing))
        {
            connections.remove(peer);
        }
    }
}

/// Accepts connections from `listener` for tonic, each wrapped in a `GuardedStream`, from
/// a task of its own (so that a failing `accept` can back off).
pub fn guarded_incoming(
    listener: TcpListener,
    guard: Arc<ConnectionGuard>,
) -> impl Stream<Item = std::io::Result<GuardedStream>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            // The listener is dropped (the port freed) as soon as the server is gone.
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tx.closed() => return,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!("rendezvous accept failed ({e}); backing off");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let guarded = GuardedStream {
                inner: stream,
                peer,
                standing: guard.admit(peer),
                guard: guard.clone(),
                deadline: Box::pin(tokio::time::sleep(guard.limits.auth_deadline)),
            };
            if tx.send(Ok(guarded)).await.is_err() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A TCP connection that fails its reads once it is closed by the guard or has not
/// authenticated within the deadline; it leaves the guard's table when dropped.
pub struct GuardedStream {
    inner: TcpStream,
    peer: SocketAddr,
    standing: Arc<Standing>,
    guard: Arc<ConnectionGuard>,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl GuardedStream {
    /// An error once the connection must go, else registers the reader's waker.
    fn refusal(&mut self, cx: &mut Context<'_>) -> Option<std::io::Error> {
        let standing = &self.standing;
        if standing.closed.load(Ordering::SeqCst) {
            return Some(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "closed: too many unauthenticated rendezvous connections",
            ));
        }
        if !standing.authenticated.load(Ordering::SeqCst) {
            if self.deadline.as_mut().poll(cx).is_ready() {
                return Some(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no authenticated rendezvous request in time",
                ));
            }
            *standing.waker.lock().unwrap_or_else(|p| p.into_inner()) = Some(cx.waker().clone());
        }
        None
    }
}

impl Drop for GuardedStream {
    fn drop(&mut self) {
        self.guard.forget(&self.peer, &self.standing);
    }
}

impl Connected for GuardedStream {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(error) = self.refusal(cx) {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Lifts this process's open-file soft limit to its hard limit (a launcher hosting many
/// ranks, or facing a flood, needs descriptors); returns the limit now in force.
pub fn raise_open_file_limit() -> std::io::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(std::io::Error::from)?;
    }
    Ok(hard.max(soft))
}
