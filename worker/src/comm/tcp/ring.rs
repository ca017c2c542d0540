//! The pipelined ring engine of the TCP backend. A collective is a `Plan`: a list of
//! steps, each sending one region to the next rank and/or receiving one region from the
//! previous rank (copied, or reduced into a destination). Regions are cut into chunks;
//! the chunk `c` sent at step `s + 1` is queued as soon as chunk `c` of step `s` has been
//! received and reduced, so sending (on a dedicated sender thread), receiving and
//! reducing (on the communication thread) overlap. Schedules for each collective live in
//! `comm/tcp/schedule.rs`; the wire contract (one 32-byte header per collective per link,
//! then raw chunks in step order) is checked on every collective.

use super::handshake::{PeerName, RingLinks};
use crate::comm::ReduceOp;
use crate::comm::elementwise::{self, ElemKind};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

/// A byte range of memory that the caller keeps alive and does not touch while
/// `Ring::run` executes (tensor storage or the communicator's scratch).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Region {
    ptr: *mut u8,
    len: usize,
}

impl Region {
    /// # Safety
    /// `ptr` must be valid for reads and writes of `len` bytes for as long as the region
    /// (or any sub-region) is used, and not be accessed by anyone else meanwhile.
    pub unsafe fn new(ptr: *mut u8, len: usize) -> Region {
        let ptr = if len == 0 {
            std::ptr::NonNull::<u64>::dangling().as_ptr().cast()
        } else {
            ptr
        };
        Region { ptr, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// The bytes `[offset, offset + len)` of this region (clamped to it).
    pub fn sub(&self, offset: usize, len: usize) -> Region {
        let offset = offset.min(self.len);
        let len = len.min(self.len - offset);
        // SAFETY: offset <= self.len, so the pointer stays inside (or one past) the region.
        Region {
            ptr: unsafe { self.ptr.add(offset) },
            len,
        }
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `Region::new`'s contract: valid for `len` bytes, not aliased mutably.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    #[allow(clippy::mut_from_ref)]
    pub fn bytes_mut(&self) -> &mut [u8] {
        // SAFETY: `Region::new`'s contract; the ring writes each region from one thread
        // only, and the schedules never send a chunk while it is being written.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    pub fn same_memory(&self, other: &Region) -> bool {
        self.ptr == other.ptr
    }
}

/// What happens to the bytes received at a step.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Incoming {
    /// They are stored into `into`.
    Copy { into: Region },
    /// `into = local (op) received`, then divided by the world size if `average`.
    Reduce {
        into: Region,
        local: Region,
        average: bool,
    },
}

impl Incoming {
    fn len(&self) -> usize {
        match self {
            Incoming::Copy { into } | Incoming::Reduce { into, .. } => into.len(),
        }
    }
}

/// One ring step on this rank.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Step {
    pub send: Option<Region>,
    pub recv: Option<Incoming>,
}

/// A collective as the ring executes it.
pub(crate) struct Plan {
    pub steps: Vec<Step>,
    pub kind: ElemKind,
    pub op: ReduceOp,
}

/// Identifies a collective on the wire; both ends of a link must agree on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub seq: u64,
    pub op_name: &'static str,
    pub elem: u8,
    pub reduce: u8,
    pub numel: u64,
    pub root: u64,
}

const HEADER_MAGIC: u32 = 0x5244_4331; // "RDC1"
const HEADER_LEN: usize = 32;
const OP_NAMES: [&str; 5] = [
    "all_reduce",
    "reduce_scatter",
    "all_gather",
    "broadcast",
    "barrier",
];

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut bytes = [0u8; HEADER_LEN];
        let op_code = OP_NAMES
            .iter()
            .position(|n| *n == self.op_name)
            .unwrap_or(255) as u8;
        bytes[0..4].copy_from_slice(&HEADER_MAGIC.to_le_bytes());
        bytes[4] = op_code;
        bytes[5] = self.elem;
        bytes[6] = self.reduce;
        bytes[8..16].copy_from_slice(&self.seq.to_le_bytes());
        bytes[16..24].copy_from_slice(&self.numel.to_le_bytes());
        bytes[24..32].copy_from_slice(&self.root.to_le_bytes());
        bytes
    }

    fn decode(bytes: &[u8; HEADER_LEN]) -> Option<Header> {
        let word = |range: std::ops::Range<usize>| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[range]);
            u64::from_le_bytes(b)
        };
        let magic = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let op_name = OP_NAMES.get(bytes[4] as usize)?;
        (magic == HEADER_MAGIC).then_some(Header {
            seq: word(8..16),
            op_name,
            elem: bytes[5],
            reduce: bytes[6],
            numel: word(16..24),
            root: word(24..32),
        })
    }
}

/// A pointer the sender thread may read from; see `Region`'s contract.
struct SendChunk(Region);
// SAFETY: the communication thread keeps the memory alive and unmodified until the
// sender thread has acknowledged the collective's fence (see `Ring::run`).
unsafe impl Send for SendChunk {}

enum SendCmd {
    Header([u8; HEADER_LEN]),
    Chunk(SendChunk),
    /// Report the outcome of everything queued before it.
    Fence,
}

/// Writes queued chunks to the next rank, in order; after a failure it skips until the
/// next fence, where it reports the failure.
fn sender_loop(
    mut stream: TcpStream,
    commands: mpsc::Receiver<SendCmd>,
    outcomes: mpsc::Sender<io::Result<()>>,
) {
    let mut failure: Option<io::Error> = None;
    while let Ok(command) = commands.recv() {
        let written = match (&failure, command) {
            (_, SendCmd::Fence) => {
                let outcome = failure.take().map_or(Ok(()), Err);
                if outcomes.send(outcome).is_err() {
                    return;
                }
                continue;
            }
            (Some(_), _) => continue,
            (None, SendCmd::Header(bytes)) => stream.write_all(&bytes),
            (None, SendCmd::Chunk(chunk)) => stream.write_all(chunk.0.bytes()),
        };
        failure = written.err();
    }
}

/// This rank's two ring links, the sender thread, and the receive buffer.
pub(crate) struct Ring {
    world: usize,
    next: PeerName,
    prev: PeerName,
    from_prev: TcpStream,
    to_next: TcpStream,
    commands: Option<mpsc::Sender<SendCmd>>,
    outcomes: mpsc::Receiver<io::Result<()>>,
    sender: Option<JoinHandle<()>>,
    receive_buffer: Vec<u64>,
    chunk_bytes: usize,
    op_timeout: Duration,
    seq: u64,
}

impl Ring {
    pub fn new(
        world: usize,
        next: PeerName,
        prev: PeerName,
        links: RingLinks,
        chunk_bytes: usize,
        op_timeout: Duration,
    ) -> io::Result<Ring> {
        let (commands, queued) = mpsc::channel();
        let (outcome_tx, outcomes) = mpsc::channel();
        let writer = links.to_next.try_clone()?;
        let sender = std::thread::Builder::new()
            .name(format!("rsdeep-comm-send-{}", next.rank))
            .spawn(move || sender_loop(writer, queued, outcome_tx))?;
        let chunk_bytes = chunk_bytes.max(8) / 8 * 8; // element-aligned for every dtype
        Ok(Ring {
            world,
            next,
            prev,
            from_prev: links.from_prev,
            to_next: links.to_next,
            commands: Some(commands),
            outcomes,
            sender: Some(sender),
            receive_buffer: vec![0u64; chunk_bytes / 8],
            chunk_bytes,
            op_timeout,
            seq: 0,
        })
    }

    /// Closes both links so that neighbours notice at once (used after a failure).
    pub fn shut_down(&self) {
        let _ = self.to_next.shutdown(Shutdown::Both);
        let _ = self.from_prev.shutdown(Shutdown::Both);
    }

    /// Whether both neighbours still hold their end of the links. Shared-memory
    /// collectives send nothing over TCP, so a closed socket is how a dead neighbour shows.
    pub fn check_links(&self) -> Result<(), String> {
        for (stream, peer) in [(&self.from_prev, &self.prev), (&self.to_next, &self.next)] {
            let mut byte = 0u8;
            // SAFETY: peeks at most one byte into a live local; the fd is owned by `stream`.
            let got = unsafe {
                libc::recv(
                    stream.as_raw_fd(),
                    (&mut byte as *mut u8).cast(),
                    1,
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            if got == 0 {
                return Err(format!("{peer} closed the connection"));
            }
            let error = io::Error::last_os_error();
            let alive = got > 0
                || matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                );
            if !alive {
                return Err(format!("link to {peer}: {error}"));
            }
        }
        Ok(())
    }

    fn queue(&self, command: SendCmd) -> Result<(), String> {
        let sent = self.commands.as_ref().map(|c| c.send(command));
        match sent {
            Some(Ok(())) => Ok(()),
            _ => Err(format!("the sender thread for {} has exited", self.next)),
        }
    }

    fn queue_chunks(&self, region: Region, first: usize, count: usize) -> Result<(), String> {
        for chunk in 0..count {
            let offset = (first + chunk) * self.chunk_bytes;
            self.queue(SendCmd::Chunk(SendChunk(
                region.sub(offset, self.chunk_bytes),
            )))?;
        }
        Ok(())
    }

    /// Runs one collective. Every region in `plan` must stay valid until this returns.
    pub fn run(&mut self, mut header: Header, plan: &Plan) -> Result<(), String> {
        validate(plan)?;
        self.seq += 1;
        header.seq = self.seq;
        self.queue(SendCmd::Header(header.encode()))?;
        if let Some(first) = plan.steps.first().and_then(|s| s.send) {
            self.queue_chunks(first, 0, first.len().div_ceil(self.chunk_bytes))?;
        }
        let received = self.receive_all(&header, plan);
        if received.is_err() {
            // Unblocks a sender stuck on a full socket; the ring is unusable anyway.
            self.shut_down();
        }
        self.queue(SendCmd::Fence)?;
        let sent = match self.outcomes.recv() {
            Ok(outcome) => outcome.map_err(|e| format!("sending to {}: {e}", self.next)),
            Err(_) => Err(format!("the sender thread for {} has exited", self.next)),
        };
        received.and(sent)
    }

    fn receive_all(&mut self, header: &Header, plan: &Plan) -> Result<(), String> {
        self.receive_header(header)?;
        for (index, step) in plan.steps.iter().enumerate() {
            let Some(incoming) = step.recv else { continue };
            let forward = plan.steps.get(index + 1).and_then(|next| next.send);
            let chunks = incoming.len().div_ceil(self.chunk_bytes);
            for chunk in 0..chunks {
                self.receive_chunk(&incoming, chunk, plan)?;
                if let Some(forward) = forward {
                    self.queue_chunks(forward, chunk, 1)?;
                }
            }
        }
        Ok(())
    }

    fn receive_header(&mut self, mine: &Header) -> Result<(), String> {
        let mut bytes = [0u8; HEADER_LEN];
        self.read_exact(&mut bytes)?;
        let theirs = Header::decode(&bytes)
            .ok_or_else(|| format!("{} sent a corrupt collective header", self.prev))?;
        if theirs != *mine {
            return Err(format!(
                "collectives out of step: {} issued {} #{} of {} elements (dtype code {}, op code {}, root {}) \
                 where this rank issued {} #{} of {} (dtype code {}, op code {}, root {})",
                self.prev,
                theirs.op_name,
                theirs.seq,
                theirs.numel,
                theirs.elem,
                theirs.reduce,
                theirs.root,
                mine.op_name,
                mine.seq,
                mine.numel,
                mine.elem,
                mine.reduce,
                mine.root
            ));
        }
        Ok(())
    }

    fn receive_chunk(
        &mut self,
        incoming: &Incoming,
        chunk: usize,
        plan: &Plan,
    ) -> Result<(), String> {
        let offset = chunk * self.chunk_bytes;
        match *incoming {
            Incoming::Copy { into } => {
                self.read_exact(into.sub(offset, self.chunk_bytes).bytes_mut())
            }
            Incoming::Reduce {
                into,
                local,
                average,
            } => {
                let into = into.sub(offset, self.chunk_bytes);
                let local = local.sub(offset, self.chunk_bytes);
                let mut buffer = std::mem::take(&mut self.receive_buffer);
                let received = reinterpret_bytes_mut(&mut buffer, into.len());
                let read = self.read_exact(received);
                let reduced = read
                    .and_then(|()| reduce_chunk(plan, into, local, received, average, self.world));
                self.receive_buffer = buffer;
                reduced
            }
        }
    }

    fn read_exact(&mut self, buffer: &mut [u8]) -> Result<(), String> {
        self.from_prev.read_exact(buffer).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => format!("{} closed the connection", self.prev),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => format!(
                "no data from {} for {:?} (the op timeout): it is dead, hung or not issuing this collective",
                self.prev, self.op_timeout
            ),
            _ => format!("receiving from {}: {e}", self.prev),
        })
    }
}

fn reinterpret_bytes_mut(words: &mut [u64], len: usize) -> &mut [u8] {
    // SAFETY: u64 storage viewed as bytes (any alignment is fine for u8); len is clamped
    // to the buffer's byte size.
    let len = len.min(words.len() * 8);
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), len) }
}

fn reduce_chunk(
    plan: &Plan,
    into: Region,
    local: Region,
    received: &[u8],
    average: bool,
    world: usize,
) -> Result<(), String> {
    let ok = if into.same_memory(&local) {
        elementwise::reduce_in_place(plan.kind, plan.op, into.bytes_mut(), received)
    } else {
        elementwise::reduce_into(
            plan.kind,
            plan.op,
            into.bytes_mut(),
            local.bytes(),
            received,
        )
    };
    let ok = ok && (!average || elementwise::divide(plan.kind, into.bytes_mut(), world));
    ok.then_some(())
        .ok_or_else(|| "internal: misaligned or mismatched reduction buffers".to_string())
}

/// The pipelining rule needs: a step > 0 that sends forwards what the step before received.
fn validate(plan: &Plan) -> Result<(), String> {
    for (index, pair) in plan.steps.windows(2).enumerate() {
        if let Some(send) = pair[1].send {
            match pair[0].recv {
                Some(incoming) if incoming.len() == send.len() => {}
                _ => {
                    return Err(format!(
                        "internal: ring step {} sends without a matching receive",
                        index + 1
                    ));
                }
            }
        }
    }
    Ok(())
}

impl Drop for Ring {
    fn drop(&mut self) {
        self.shut_down();
        self.commands = None; // ends the sender loop
        if let Some(sender) = self.sender.take() {
            let _ = sender.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let header = Header {
            seq: 7,
            op_name: "reduce_scatter",
            elem: 3,
            reduce: 1,
            numel: 1 << 40,
            root: 2,
        };
        assert_eq!(Header::decode(&header.encode()), Some(header));
        let mut corrupt = header.encode();
        corrupt[0] ^= 1;
        assert_eq!(Header::decode(&corrupt), None);
    }

    #[test]
    fn region_sub_clamps() {
        let mut data = [0u8; 10];
        // SAFETY: `data` outlives the region and is only used through it here.
        let region = unsafe { Region::new(data.as_mut_ptr(), data.len()) };
        assert_eq!(region.sub(8, 4).len(), 2);
        assert_eq!(region.sub(12, 4).len(), 0);
        let empty = unsafe { Region::new(std::ptr::null_mut(), 0) };
        assert!(
            empty.bytes().is_empty(),
            "an empty region never exposes a null pointer"
        );
    }
}
