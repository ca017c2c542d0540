//! Ring connection setup for the TCP backend: each rank connects to its next neighbour
//! and accepts one authenticated connection from its previous neighbour. The contract
//! (see `comm/tcp/mod.rs`): the first bytes on every connection are a hello
//! `magic(8) | rank u32 | world u32 | token_len u32 | token`, answered by an ack of the
//! same layout with another magic. A connection whose magic, job token, rank or world
//! size is wrong is logged and closed; nothing it sent is ever read as data.

use super::TcpOptions;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

const HELLO_MAGIC: &[u8; 8] = b"RSDPRNG1";
const ACK_MAGIC: &[u8; 8] = b"RSDPACK1";
/// Longest job token accepted in a hello (a garbage length must not make us allocate).
const MAX_TOKEN_LEN: usize = 4096;
/// How long an accepted connection may take to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(2);

/// The two persistent sockets of one rank in the ring.
pub(crate) struct RingLinks {
    pub to_next: TcpStream,
    pub from_prev: TcpStream,
}

/// Who is on the other end of a link, for error messages: "peer rank K (addr)".
#[derive(Debug, Clone)]
pub(crate) struct PeerName {
    pub rank: usize,
    pub addr: String,
}

impl std::fmt::Display for PeerName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "peer rank {} ({})", self.rank, self.addr)
    }
}

struct Hello {
    rank: usize,
    world: usize,
    token: Vec<u8>,
}

fn encode_hello(magic: &[u8; 8], rank: usize, world: usize, token: &str) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(20 + token.len());
    bytes.extend_from_slice(magic);
    bytes.extend_from_slice(&(rank as u32).to_le_bytes());
    bytes.extend_from_slice(&(world as u32).to_le_bytes());
    bytes.extend_from_slice(&(token.len() as u32).to_le_bytes());
    bytes.extend_from_slice(token.as_bytes());
    bytes
}

fn read_u32(stream: &mut TcpStream) -> io::Result<u32> {
    let mut word = [0u8; 4];
    stream.read_exact(&mut word)?;
    Ok(u32::from_le_bytes(word))
}

/// Reads a hello or ack; `Err` describes why it is not one.
fn read_hello(stream: &mut TcpStream, magic: &[u8; 8]) -> Result<Hello, String> {
    let mut got = [0u8; 8];
    stream
        .read_exact(&mut got)
        .map_err(|e| format!("no handshake: {e}"))?;
    if &got != magic {
        return Err(format!("bad magic {:02x?}", got));
    }
    let header =
        (|| Ok::<_, io::Error>((read_u32(stream)?, read_u32(stream)?, read_u32(stream)?)))();
    let (rank, world, token_len) = header.map_err(|e| format!("truncated handshake: {e}"))?;
    if token_len as usize > MAX_TOKEN_LEN {
        return Err(format!("token length {token_len} over {MAX_TOKEN_LEN}"));
    }
    let mut token = vec![0u8; token_len as usize];
    stream
        .read_exact(&mut token)
        .map_err(|e| format!("truncated token: {e}"))?;
    Ok(Hello {
        rank: rank as usize,
        world: world as usize,
        token,
    })
}

/// Compares without an early exit, so timing does not reveal the token's prefix.
fn token_matches(got: &[u8], expected: &str) -> bool {
    let expected = expected.as_bytes();
    got.len() == expected.len()
        && got
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn check_hello(hello: &Hello, want_rank: usize, world: usize, token: &str) -> Result<(), String> {
    if !token_matches(&hello.token, token) {
        return Err("wrong job token".into());
    }
    if hello.world != world {
        return Err(format!("world size {} instead of {world}", hello.world));
    }
    if hello.rank != want_rank {
        return Err(format!("claims rank {} instead of {want_rank}", hello.rank));
    }
    Ok(())
}

fn remaining(deadline: Instant) -> Option<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
}

fn resolve(addr: &str) -> Result<SocketAddr, String> {
    let mut addrs = addr
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {addr}: {e}"))?;
    addrs
        .next()
        .ok_or_else(|| format!("{addr} resolves to no address"))
}

/// Connects to `peer`, retrying (it may not listen yet) until `deadline`.
fn connect_with_retry(peer: &PeerName, deadline: Instant) -> Result<TcpStream, String> {
    let addr = resolve(&peer.addr)?;
    loop {
        let attempt = remaining(deadline)
            .map(|left| TcpStream::connect_timeout(&addr, left.min(Duration::from_secs(5))));
        match attempt {
            Some(Ok(stream)) => return Ok(stream),
            Some(Err(_)) => std::thread::sleep(Duration::from_millis(20)),
            None => {
                return Err(format!(
                    "could not connect to {peer} before the connect timeout"
                ));
            }
        }
    }
}

/// Accepts connections until one carries a valid hello from `prev`; others are dropped.
fn accept_from(
    listener: &TcpListener,
    prev: &PeerName,
    world: usize,
    token: &str,
    deadline: Instant,
) -> Result<TcpStream, String> {
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("listener: {e}"))?;
    loop {
        let Some(left) = remaining(deadline) else {
            return Err(format!("{prev} did not connect before the connect timeout"));
        };
        match listener.accept() {
            Ok((mut stream, from)) => {
                let hello = stream
                    .set_nonblocking(false)
                    .and_then(|()| stream.set_read_timeout(Some(left.min(HELLO_TIMEOUT))))
                    .map_err(|e| e.to_string())
                    .and_then(|()| read_hello(&mut stream, HELLO_MAGIC))
                    .and_then(|hello| check_hello(&hello, prev.rank, world, token));
                match hello {
                    Ok(()) => return Ok(stream),
                    Err(why) => {
                        tracing::warn!(%from, expected = %prev, "dropped ring connection: {why}")
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => return Err(format!("accept failed while waiting for {prev}: {e}")),
        }
    }
}

/// Sets an integer socket option; failures only cost performance, so they are logged.
fn set_socket_buffer(stream: &TcpStream, option: libc::c_int, bytes: usize) {
    let value = bytes.min(i32::MAX as usize) as libc::c_int;
    // SAFETY: `stream` owns a valid socket fd for the duration of the call, and we pass a
    // pointer to a live c_int with its exact size, as setsockopt(2) requires.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::debug!(
            "setsockopt({option}) failed: {}",
            io::Error::last_os_error()
        );
    }
}

fn configure(links: &RingLinks, options: &TcpOptions) -> io::Result<()> {
    for stream in [&links.to_next, &links.from_prev] {
        stream.set_nodelay(true)?;
        if let Some(bytes) = options.socket_buffer_bytes {
            set_socket_buffer(stream, libc::SO_SNDBUF, bytes);
            set_socket_buffer(stream, libc::SO_RCVBUF, bytes);
        }
    }
    links.from_prev.set_read_timeout(Some(options.op_timeout))?;
    links.to_next.set_write_timeout(Some(options.op_timeout))?;
    Ok(())
}

/// Forms this rank's place in the ring: connect to `next`, accept from `prev`, exchange
/// hello and ack (both carry the job token), then apply socket options.
pub(crate) fn connect_ring(
    rank: usize,
    world: usize,
    next: &PeerName,
    prev: &PeerName,
    listener: &TcpListener,
    token: &str,
    options: &TcpOptions,
) -> Result<RingLinks, String> {
    let deadline = Instant::now() + options.connect_timeout;
    let mut to_next = connect_with_retry(next, deadline)?;
    to_next
        .write_all(&encode_hello(HELLO_MAGIC, rank, world, token))
        .map_err(|e| format!("sending hello to {next}: {e}"))?;
    let mut from_prev = accept_from(listener, prev, world, token, deadline)?;
    from_prev
        .write_all(&encode_hello(ACK_MAGIC, rank, world, token))
        .map_err(|e| format!("sending ack to {prev}: {e}"))?;
    let left = remaining(deadline)
        .ok_or_else(|| format!("no ack from {next} before the connect timeout"))?;
    to_next
        .set_read_timeout(Some(left))
        .map_err(|e| e.to_string())?;
    let ack = read_hello(&mut to_next, ACK_MAGIC)
        .and_then(|ack| check_hello(&ack, next.rank, world, token));
    ack.map_err(|why| format!("bad ack from {next}: {why}"))?;
    let links = RingLinks { to_next, from_prev };
    configure(&links, options).map_err(|e| format!("socket options: {e}"))?;
    Ok(links)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison_is_exact() {
        assert!(token_matches(b"secret", "secret"));
        assert!(!token_matches(b"secreT", "secret"));
        assert!(!token_matches(b"secret!", "secret"));
        assert!(!token_matches(b"", "secret"));
    }

    #[test]
    fn hello_round_trips_and_rejects_wrong_fields() -> Result<(), String> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let mut client = TcpStream::connect(addr).map_err(|e| e.to_string())?;
        client
            .write_all(&encode_hello(HELLO_MAGIC, 3, 4, "tok"))
            .map_err(|e| e.to_string())?;
        let (mut server, _) = listener.accept().map_err(|e| e.to_string())?;
        let hello = read_hello(&mut server, HELLO_MAGIC)?;
        assert_eq!(
            (hello.rank, hello.world, hello.token.as_slice()),
            (3, 4, &b"tok"[..])
        );
        assert!(check_hello(&hello, 3, 4, "tok").is_ok());
        assert!(check_hello(&hello, 3, 4, "other").is_err());
        assert!(check_hello(&hello, 2, 4, "tok").is_err());
        assert!(check_hello(&hello, 3, 5, "tok").is_err());
        Ok(())
    }
}
