//! Test support for the TCP backend: runs a world of in-process ranks (one thread each,
//! listeners on 127.0.0.1 ephemeral ports) and hands each rank its `TcpComm`.

use super::{TcpComm, TcpOptions};
use crate::Result;
use std::net::TcpListener;
use std::time::Duration;

/// Options for tests: short timeouts, tiny chunks so that pipelining is exercised.
pub(crate) fn test_options(chunk_bytes: usize) -> TcpOptions {
    TcpOptions {
        connect_timeout: Duration::from_secs(20),
        op_timeout: Duration::from_secs(2),
        chunk_bytes,
        socket_buffer_bytes: None,
        shared_memory_slot_bytes: None,
    }
}

/// Binds `world` listeners; returns them with their rank-ordered addresses.
pub(crate) fn bind_listeners(world: usize) -> Result<(Vec<TcpListener>, Vec<String>)> {
    let mut listeners = Vec::new();
    let mut addrs = Vec::new();
    for _ in 0..world {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| crate::Error::io("bind", e))?;
        addrs.push(
            listener
                .local_addr()
                .map_err(|e| crate::Error::io("local_addr", e))?
                .to_string(),
        );
        listeners.push(listener);
    }
    Ok((listeners, addrs))
}

/// Runs `body(rank, comm)` on `world` ranks (threads) already bound to `listeners`.
pub(crate) fn run_world_on<T: Send + 'static>(
    listeners: Vec<TcpListener>,
    addrs: Vec<String>,
    options: TcpOptions,
    body: impl Fn(usize, TcpComm) -> Result<T> + Send + Sync + Clone + 'static,
) -> Vec<Result<T>> {
    let world = listeners.len();
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, listener)| {
            let (addrs, options, body) = (addrs.clone(), options.clone(), body.clone());
            std::thread::spawn(move || {
                let comm = TcpComm::connect(rank, world, &addrs, listener, "test-token", options)?;
                body(rank, comm)
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| {
            h.join()
                .unwrap_or_else(|_| Err(crate::Error::Engine("rank thread panicked".into())))
        })
        .collect()
}

/// Runs `body` on a fresh world of `world` ranks; every rank's result, in rank order.
pub(crate) fn run_world<T: Send + 'static>(
    world: usize,
    options: TcpOptions,
    body: impl Fn(usize, TcpComm) -> Result<T> + Send + Sync + Clone + 'static,
) -> Result<Vec<Result<T>>> {
    let (listeners, addrs) = bind_listeners(world)?;
    Ok(run_world_on(listeners, addrs, options, body))
}
