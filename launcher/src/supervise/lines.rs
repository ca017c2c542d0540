//! Child output, line by line: one reader loop for the local workers' streams
//! (`supervisor.rs`, `[rank N]` prefix, tail and per-rank log) and the remote launchers'
//! ssh streams (`ssh.rs`, node prefix), and the poison-tolerant mutex lock both (and the
//! node coordination) use.

use std::io::{BufRead, BufReader, Read, Write};
use std::sync::{Mutex, MutexGuard};
use std::thread::JoinHandle;

/// Locks `m`, carrying on with the data of a thread that panicked while holding it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Spawns a thread that reads `stream` to its end and, for every line (newline and
/// carriage return trimmed, invalid UTF-8 replaced), writes `prefixed(line)` to stderr or
/// stdout and then calls `also(line)`.
pub(crate) fn forward(
    stream: impl Read + Send + 'static,
    to_stderr: bool,
    prefixed: impl Fn(&str) -> String + Send + 'static,
    mut also: impl FnMut(&str) + Send + 'static,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut bytes = Vec::new();
        loop {
            bytes.clear();
            match reader.read_until(b'\n', &mut bytes) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let text = String::from_utf8_lossy(&bytes);
            let line = text.trim_end_matches(['\n', '\r']);
            let out = format!("{}\n", prefixed(line));
            let _ = if to_stderr {
                std::io::stderr().lock().write_all(out.as_bytes())
            } else {
                std::io::stdout().lock().write_all(out.as_bytes())
            };
            also(line);
        }
    })
}
