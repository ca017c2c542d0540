//! Shared-memory transport of the TCP backend for worlds whose ranks all run on one host
//! (contract: `comm/tcp/mod.rs`; the arithmetic is the ring's, see `schedule.rs`, so
//! results are bit-identical to the TCP path and across ranks).
//!
//! Setup (`negotiate`): after the authenticated ring is formed, rank 0 creates a file in
//! /dev/shm named from 128 random bits (mode 0600, space reserved with
//! `posix_fallocate`), sends the name around the ring over the authenticated links; each
//! rank opens and maps it if it can; when the offer comes back, rank 0 unlinks the file
//! and sends the decision around (shared memory only if every rank mapped it, else the
//! TCP ring). So only processes that hold the job token learn the name, and the name
//! disappears from /dev/shm as soon as the world has it.
//!
//! Layout: a control page (magic, world, slot size, abort word, futex word, per-rank
//! counters and collective descriptors on their own cache lines), then two slots per
//! rank (double buffering by round parity). A collective is cut into rounds; in round
//! `k` every rank copies into its slot `k % 2` the parts other ranks reduce (its own
//! part stays in the tensor) and publishes `ready = k`; the owner of each part reduces
//! it in ring order (`x[r] op (... op (x[r+2] op x[r+1]))`, so bit for bit the ring's
//! result) and, for all-reduce, writes it into its own slot part and publishes
//! `reduced = k`; ranks then copy out the parts they need. Slot `k % 2` is rewritten in
//! round `k + 2` only: a rank publishes `ready = k + 1` after finishing round `k`, and
//! every rank waits for all `ready = k + 1` before round `k + 2`. Waiting spins
//! briefly, then sleeps on a shared futex; it fails on the op timeout (naming the ranks
//! that made no progress), when a neighbour's TCP link closes (a dead process), or when
//! another rank aborted the area (after its own failure); a failed rank aborts it, and
//! the communicator then closes its TCP links as on the TCP path. If rank 0 dies
//! between creating and unlinking the file, the name stays in /dev/shm (a known leak).

use super::handshake::{PeerName, RingLinks};
use super::ring::Region;
use crate::comm::ReduceOp;
use crate::comm::elementwise::{self, ElemKind};
use memmap2::MmapMut;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const AREA_MAGIC: u64 = 0x3130_4d48_5344_5352; // "RSDSHM01"
const OFFER_MAGIC: &[u8; 8] = b"RSDSHMO1";
const LINE: usize = 128;
const LINES_START: usize = 256;
const ABORT_AT: usize = 64;
const WAKE_AT: usize = 128;
const SLEEPERS_AT: usize = 192;
const SPINS_BEFORE_SLEEP: u32 = 2000;
const SLEEP_SLICE: Duration = Duration::from_millis(20);
const LIVENESS_EVERY: Duration = Duration::from_millis(20);

/// The per-rank counters, each written only by its rank.
#[derive(Debug, Clone, Copy)]
enum Counter {
    Ready = 0,
    Reduced = 1,
}

/// One collective as the shared-memory engine runs it; built by the executor.
pub(crate) struct SharedPlan {
    /// Identity of the collective (op, dtype/op codes, numel, root): every rank must
    /// issue the same one (checked at every round).
    pub desc: [u64; 3],
    /// `world` for reductions (part `j` sits at offset `j * part` of every slot), `1`
    /// for gathers (part `j` sits at the start of rank `j`'s slot).
    pub parts_per_slot: usize,
    /// This rank's contribution: part `j` comes from the region.
    pub publish: Vec<(usize, Region)>,
    /// The part this rank reduces, if any.
    pub reduce: Option<SharedReduce>,
    /// Parts to copy out of their owner's slot (part `j` is owned by rank `j`).
    pub collect: Vec<(usize, Region)>,
}

/// Reduction of this rank's part over `local` (this rank's own data for it, never
/// copied to the slot) and the other ranks' slots, into `into` (may be `local`).
pub(crate) struct SharedReduce {
    pub into: Region,
    pub local: Region,
    pub kind: ElemKind,
    pub op: ReduceOp,
    pub average: bool,
    /// Put the result back into this rank's slot for the others (all-reduce).
    pub republish: bool,
}

/// The mapped area and this rank's progress through it.
pub(crate) struct SharedArea {
    /// Start of `_map`, taken once through `as_mut_ptr` (every access goes through it).
    base: *mut u8,
    _map: MmapMut,
    rank: usize,
    world: usize,
    slot_bytes: usize,
    data_offset: usize,
    peers: Vec<PeerName>,
    op_timeout: Duration,
    round: u64,
}

// SAFETY: the raw pointer addresses the mapping owned by the same struct; the area is
// used by one thread at a time (the communication thread that owns it).
unsafe impl Send for SharedArea {}

fn data_offset(world: usize) -> usize {
    (LINES_START + world * LINE).div_ceil(4096) * 4096
}

fn area_len(world: usize, slot_bytes: usize) -> usize {
    data_offset(world) + 2 * world * slot_bytes
}

/// The slot size actually used: a multiple of `8 * world`, at least that.
pub(crate) fn effective_slot_bytes(requested: usize, world: usize) -> usize {
    let unit = 8 * world;
    (requested / unit).max(1) * unit
}

fn futex(word: &AtomicU32, op: libc::c_int, value: u32, timeout: Option<Duration>) {
    let spec = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs() as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let spec_ptr = spec
        .as_ref()
        .map_or(std::ptr::null(), |s| s as *const libc::timespec);
    // SAFETY: `word` is a live, aligned 32-bit atomic in a shared mapping; the kernel only
    // compares/wakes on it. The timespec outlives the call. Shared (not PRIVATE) futex
    // ops because the waiters are in other processes.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            op,
            value,
            spec_ptr,
            std::ptr::null::<u32>(),
            0,
        );
    }
}

impl SharedArea {
    fn u64_at(&self, offset: usize) -> &AtomicU64 {
        debug_assert!(offset.is_multiple_of(8) && offset + 8 <= self.data_offset);
        // SAFETY: the offset is 8-aligned inside the control page of a live, page-aligned
        // mapping; all access to control words goes through atomics.
        unsafe { &*self.base.add(offset).cast::<AtomicU64>() }
    }

    fn u32_at(&self, offset: usize) -> &AtomicU32 {
        // SAFETY: as in `u64_at`, for a 4-byte word.
        unsafe { &*self.base.add(offset).cast::<AtomicU32>() }
    }

    fn counter(&self, rank: usize, counter: Counter) -> &AtomicU64 {
        self.u64_at(LINES_START + rank * LINE + 8 * counter as usize)
    }

    fn desc(&self, rank: usize, parity: usize, word: usize) -> &AtomicU64 {
        self.u64_at(LINES_START + rank * LINE + 32 + parity * 32 + 8 * word)
    }

    /// Rank `rank`'s slot for `parity`, as a region of the mapping.
    fn slot(&self, rank: usize, parity: usize) -> Region {
        let offset = self.data_offset + (2 * rank + parity) * self.slot_bytes;
        // SAFETY: inside the mapping, which lives as long as `self`; the round protocol
        // gives each slot a single writer and no reader while it is written.
        unsafe { Region::new(self.base.add(offset), self.slot_bytes) }
    }

    /// Marks the area aborted by this rank and wakes every sleeper.
    pub fn abort(&self) {
        let _ = self.u32_at(ABORT_AT).compare_exchange(
            0,
            self.rank as u32 + 1,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        self.wake_all();
    }

    fn wake_all(&self) {
        let wake = self.u32_at(WAKE_AT);
        wake.fetch_add(1, Ordering::SeqCst);
        if self.u32_at(SLEEPERS_AT).load(Ordering::SeqCst) > 0 {
            futex(wake, libc::FUTEX_WAKE, i32::MAX as u32, None);
        }
    }

    fn publish(&self, counter: Counter, round: u64) {
        self.counter(self.rank, counter)
            .store(round, Ordering::SeqCst);
        self.wake_all();
    }

    /// Ranks whose `counter` is still below `round`.
    fn laggards(&self, counter: Counter, round: u64) -> Vec<usize> {
        (0..self.world)
            .filter(|&r| self.counter(r, counter).load(Ordering::SeqCst) < round)
            .collect()
    }

    fn describe_laggards(&self, laggards: &[usize]) -> String {
        let names: Vec<String> = laggards
            .iter()
            .map(|&r| format!("no data from {}", self.peers[r]))
            .collect();
        format!(
            "{} for {:?} (the op timeout): dead, hung or not issuing this collective",
            names.join(", "),
            self.op_timeout
        )
    }

    /// Blocks until every rank's `counter` reaches `round`.
    fn wait_all(
        &self,
        counter: Counter,
        round: u64,
        links_alive: &dyn Fn() -> Result<(), String>,
    ) -> Result<(), String> {
        let started = Instant::now();
        let mut last_liveness = started;
        let mut spins = 0u32;
        loop {
            let wake_seen = self.u32_at(WAKE_AT).load(Ordering::SeqCst);
            let laggards = self.laggards(counter, round);
            if laggards.is_empty() {
                return Ok(());
            }
            let aborted_by = self.u32_at(ABORT_AT).load(Ordering::SeqCst);
            if aborted_by != 0 {
                return Err(format!(
                    "{} abandoned the collective after its own failure; still waiting on: {}",
                    self.peers[(aborted_by as usize - 1).min(self.world - 1)],
                    self.describe_laggards(&laggards)
                ));
            }
            if spins < SPINS_BEFORE_SLEEP {
                spins += 1;
                std::hint::spin_loop();
                continue;
            }
            let now = Instant::now();
            if now.duration_since(started) > self.op_timeout {
                return Err(self.describe_laggards(&laggards));
            }
            if now.duration_since(last_liveness) > LIVENESS_EVERY {
                links_alive()?;
                last_liveness = now;
            }
            self.sleep_unless_changed(counter, round, wake_seen);
        }
    }

    /// Sleeps on the futex word until a publish changes it (or a short slice passes).
    fn sleep_unless_changed(&self, counter: Counter, round: u64, wake_seen: u32) {
        let sleepers = self.u32_at(SLEEPERS_AT);
        sleepers.fetch_add(1, Ordering::SeqCst);
        if !self.laggards(counter, round).is_empty() {
            futex(
                self.u32_at(WAKE_AT),
                libc::FUTEX_WAIT,
                wake_seen,
                Some(SLEEP_SLICE),
            );
        }
        sleepers.fetch_sub(1, Ordering::SeqCst);
    }

    fn check_descs(&self, parity: usize, mine: &[u64; 3]) -> Result<(), String> {
        for rank in 0..self.world {
            let theirs = [0, 1, 2].map(|w| self.desc(rank, parity, w).load(Ordering::SeqCst));
            if theirs != *mine {
                return Err(format!(
                    "collectives out of step: {} issued collective {theirs:x?} where this rank issued {mine:x?} (op code, numel, dtype/op/root)",
                    self.peers[rank]
                ));
            }
        }
        Ok(())
    }

    /// Runs one collective; every region in `plan` must stay valid until this returns.
    /// `links_alive` reports a neighbour whose TCP link has closed.
    pub fn run(
        &mut self,
        plan: &SharedPlan,
        links_alive: &dyn Fn() -> Result<(), String>,
    ) -> Result<(), String> {
        let outcome = self.run_rounds(plan, links_alive);
        if outcome.is_err() {
            self.abort();
        }
        outcome
    }

    fn part_bytes(&self, plan: &SharedPlan) -> usize {
        self.slot_bytes / plan.parts_per_slot.max(1)
    }

    fn rounds(&self, plan: &SharedPlan) -> usize {
        let part = self.part_bytes(plan);
        let longest = plan
            .publish
            .iter()
            .chain(&plan.collect)
            .map(|(_, region)| region.len())
            .chain(plan.reduce.as_ref().map(|r| r.into.len()))
            .max()
            .unwrap_or(0);
        longest.div_ceil(part)
    }

    fn run_rounds(
        &mut self,
        plan: &SharedPlan,
        links_alive: &dyn Fn() -> Result<(), String>,
    ) -> Result<(), String> {
        let part = self.part_bytes(plan);
        let place = |j: usize| (j % plan.parts_per_slot.max(1)) * part;
        for chunk in 0..self.rounds(plan) {
            self.round += 1;
            let (round, parity) = (self.round, (self.round % 2) as usize);
            // Slot `parity` was last used in round `round - 2`; every rank published
            // `ready = round - 1` (seen in the previous round) only after finishing it.
            let offset = chunk * part;
            for (w, value) in plan.desc.iter().enumerate() {
                self.desc(self.rank, parity, w)
                    .store(*value, Ordering::SeqCst);
            }
            let mine = self.slot(self.rank, parity);
            for (j, source) in &plan.publish {
                let source = source.sub(offset, part);
                mine.sub(place(*j), source.len())
                    .bytes_mut()
                    .copy_from_slice(source.bytes());
            }
            self.publish(Counter::Ready, round);
            self.wait_all(Counter::Ready, round, links_alive)?;
            self.check_descs(parity, &plan.desc)?;
            if let Some(reduce) = &plan.reduce {
                let (into, local) = (
                    reduce.into.sub(offset, part),
                    reduce.local.sub(offset, part),
                );
                self.reduce_part(reduce, into, local, parity, place(self.rank))?;
                if reduce.republish {
                    self.publish(Counter::Reduced, round);
                    self.wait_all(Counter::Reduced, round, links_alive)?;
                }
            }
            for (j, dest) in &plan.collect {
                let dest = dest.sub(offset, part);
                let theirs = self.slot(*j, parity).sub(place(*j), dest.len());
                dest.bytes_mut().copy_from_slice(theirs.bytes());
            }
        }
        Ok(())
    }

    /// `into = x[r] op (x[r-1] op (... op (x[r+2] op x[r+1])))`, in ring order, so the
    /// result is the TCP ring's bit for bit (`x[r]` is `local`, the others come from
    /// their slots, the part at byte `at` of each); then the `Avg` division; then, for
    /// all-reduce, the result is put in this rank's own slot part (`own_part`, which
    /// carried no data for this part).
    fn reduce_part(
        &self,
        reduce: &SharedReduce,
        into: Region,
        local: Region,
        parity: usize,
        at: usize,
    ) -> Result<(), String> {
        let source = |step: usize| {
            self.slot((self.rank + step) % self.world, parity)
                .sub(at, into.len())
        };
        let own_part = source(0);
        let (kind, op, world) = (reduce.kind, reduce.op, self.world);
        let in_place = into.same_memory(&local);
        // The partial reduction of every rank but this one, in ring order.
        let partial = if world == 2 {
            source(1)
        } else {
            let acc = if in_place { own_part } else { into };
            let mut ok = elementwise::reduce_into(
                kind,
                op,
                acc.bytes_mut(),
                source(2).bytes(),
                source(1).bytes(),
            );
            for step in 3..world {
                ok = ok
                    && elementwise::reduce_local_first(
                        kind,
                        op,
                        acc.bytes_mut(),
                        source(step).bytes(),
                    );
            }
            if !ok {
                return Err(MISALIGNED.into());
            }
            acc
        };
        let fused = in_place && reduce.republish && !reduce.average && world == 2;
        let ok = match (in_place, fused) {
            (true, true) => elementwise::reduce_in_place_and_copy(
                kind,
                op,
                into.bytes_mut(),
                partial.bytes(),
                own_part.bytes_mut(),
            ),
            (true, false) => {
                elementwise::reduce_in_place(kind, op, into.bytes_mut(), partial.bytes())
            }
            (false, _) if world == 2 => {
                elementwise::reduce_into(kind, op, into.bytes_mut(), local.bytes(), partial.bytes())
            }
            (false, _) => {
                elementwise::reduce_local_first(kind, op, into.bytes_mut(), local.bytes())
            }
        };
        let ok = ok && (!reduce.average || elementwise::divide(kind, into.bytes_mut(), world));
        if !ok {
            return Err(MISALIGNED.into());
        }
        if reduce.republish && !fused {
            own_part.bytes_mut().copy_from_slice(into.bytes());
        }
        Ok(())
    }
}

const MISALIGNED: &str = "internal: misaligned shared-memory reduction buffers";

/// A /dev/shm file created by rank 0, unlinked when dropped.
struct CreatedFile {
    path: PathBuf,
}

impl Drop for CreatedFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn random_name() -> Result<String, String> {
    let mut bytes = [0u8; 16];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the live buffer.
    let got = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if got != bytes.len() as isize {
        return Err(format!("getrandom: {}", std::io::Error::last_os_error()));
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("/dev/shm/rsdeep-comm-{hex}"))
}

fn map_file(file: &File) -> Result<MmapMut, String> {
    // SAFETY: the file is private to this job (mode 0600, random name unlinked once the
    // world has opened it) and is only accessed through the round protocol's atomics and
    // slot ownership rules.
    unsafe { MmapMut::map_mut(file) }.map_err(|e| format!("mmap: {e}"))
}

/// Rank 0: creates, sizes (with real pages reserved) and initialises the area.
fn create_area(world: usize, slot_bytes: usize) -> Result<(CreatedFile, MmapMut), String> {
    let path = PathBuf::from(random_name()?);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("creating {}: {e}", path.display()))?;
    let created = CreatedFile { path };
    let len = area_len(world, slot_bytes);
    // SAFETY: plain syscall on an fd we own; reserving the pages now means a full
    // /dev/shm fails here instead of raising SIGBUS on first touch.
    let rc = unsafe {
        libc::posix_fallocate(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            0,
            len as libc::off_t,
        )
    };
    if rc != 0 {
        return Err(format!(
            "reserving {len} bytes in /dev/shm: {}",
            std::io::Error::from_raw_os_error(rc)
        ));
    }
    let mut map = map_file(&file)?;
    for (at, value) in [(0, AREA_MAGIC), (8, world as u64), (16, slot_bytes as u64)] {
        map[at..at + 8].copy_from_slice(&value.to_le_bytes());
    }
    Ok((created, map))
}

/// Other ranks: opens the offered area and checks it is the one this job described.
fn open_area(path: &str, world: usize, slot_bytes: usize) -> Result<MmapMut, String> {
    if !path.starts_with("/dev/shm/rsdeep-comm-") || path.contains("..") {
        return Err(format!("refusing to open offered path {path:?}"));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("opening {path}: {e}"))?;
    let meta = file.metadata().map_err(|e| format!("stat {path}: {e}"))?;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let len = area_len(world, slot_bytes);
    if meta.uid() != euid || meta.mode() & 0o077 != 0 || meta.len() != len as u64 {
        return Err(format!("{path} has the wrong owner, mode or size"));
    }
    let map = map_file(&file)?;
    let word = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&map[at..at + 8]);
        u64::from_le_bytes(b)
    };
    if (word(0), word(8), word(16)) != (AREA_MAGIC, world as u64, slot_bytes as u64) {
        return Err(format!("{path} does not describe this world"));
    }
    Ok(map)
}

fn send_offer(
    links: &mut RingLinks,
    usable: bool,
    slot_bytes: usize,
    path: &str,
) -> Result<(), String> {
    let mut bytes = OFFER_MAGIC.to_vec();
    bytes.push(u8::from(usable));
    bytes.extend_from_slice(&(slot_bytes as u64).to_le_bytes());
    bytes.extend_from_slice(&(path.len() as u16).to_le_bytes());
    bytes.extend_from_slice(path.as_bytes());
    links
        .to_next
        .write_all(&bytes)
        .map_err(|e| format!("sending the shared-memory offer: {e}"))
}

/// Reads an offer: (usable so far, slot bytes, path).
fn read_offer(links: &mut RingLinks) -> Result<(bool, usize, String), String> {
    let fail = |e: std::io::Error| format!("reading the shared-memory offer: {e}");
    let mut head = [0u8; 8 + 1 + 8 + 2];
    links.from_prev.read_exact(&mut head).map_err(fail)?;
    if &head[..8] != OFFER_MAGIC {
        return Err("corrupt shared-memory offer".into());
    }
    let mut slot = [0u8; 8];
    slot.copy_from_slice(&head[9..17]);
    let path_len = u16::from_le_bytes([head[17], head[18]]) as usize;
    let mut path = vec![0u8; path_len];
    links.from_prev.read_exact(&mut path).map_err(fail)?;
    let path =
        String::from_utf8(path).map_err(|_| "corrupt shared-memory offer path".to_string())?;
    Ok((head[8] == 1, u64::from_le_bytes(slot) as usize, path))
}

fn pass_decision(
    links: &mut RingLinks,
    rank: usize,
    decision: Option<bool>,
) -> Result<bool, String> {
    let fail = |e: std::io::Error| format!("passing the shared-memory decision: {e}");
    let mut byte = [u8::from(decision.unwrap_or(false))];
    if rank != 0 {
        links.from_prev.read_exact(&mut byte).map_err(fail)?;
    }
    links.to_next.write_all(&byte).map_err(fail)?;
    if rank == 0 {
        links.from_prev.read_exact(&mut byte).map_err(fail)?;
    }
    Ok(byte[0] == 1)
}

/// Agrees over the authenticated ring whether every rank can share one mapping; `Ok(None)`
/// means use the TCP ring (a rank on another host, no /dev/shm, no space, or a rank with
/// shared memory turned off: `requested_slot_bytes == None`). Every rank runs this, so the
/// wire stays in step whatever the options. `Err` only for a broken link.
pub(crate) fn negotiate(
    links: &mut RingLinks,
    rank: usize,
    peers: Vec<PeerName>,
    requested_slot_bytes: Option<usize>,
    op_timeout: Duration,
) -> Result<Option<SharedArea>, String> {
    let world = peers.len();
    let mut map = None;
    let mut created = None;
    if rank == 0 {
        let slot_bytes = effective_slot_bytes(requested_slot_bytes.unwrap_or(0), world);
        let area = match requested_slot_bytes {
            Some(_) => create_area(world, slot_bytes),
            None => Err("turned off on this rank".to_string()),
        };
        let (path, usable) = match area {
            Ok((file, area)) => {
                let path = file.path.display().to_string();
                created = Some(file);
                map = Some((area, slot_bytes));
                (path, true)
            }
            Err(why) => {
                tracing::info!(rank, "no shared-memory transport: {why}");
                (String::new(), false)
            }
        };
        send_offer(links, usable, slot_bytes, &path)?;
        let (all_mapped, _, _) = read_offer(links)?;
        drop(created.take()); // unlinked: nobody else can open it from now on
        let decision = all_mapped && map.is_some();
        pass_decision(links, rank, Some(decision))?;
        return Ok(finish(decision, map, rank, world, peers, op_timeout));
    }
    let (usable, slot_bytes, path) = read_offer(links)?;
    let mut mapped = false;
    if usable && requested_slot_bytes.is_none() {
        tracing::info!(rank, "no shared-memory transport: turned off on this rank");
    } else if usable {
        match open_area(&path, world, slot_bytes) {
            Ok(area) => {
                map = Some((area, slot_bytes));
                mapped = true;
            }
            Err(why) => tracing::info!(rank, "no shared-memory transport: {why}"),
        }
    }
    send_offer(links, usable && mapped, slot_bytes, &path)?;
    let decision = pass_decision(links, rank, None)?;
    Ok(finish(decision, map, rank, world, peers, op_timeout))
}

fn finish(
    decision: bool,
    map: Option<(MmapMut, usize)>,
    rank: usize,
    world: usize,
    peers: Vec<PeerName>,
    op_timeout: Duration,
) -> Option<SharedArea> {
    let (mut map, slot_bytes) = map.filter(|_| decision)?;
    Some(SharedArea {
        base: map.as_mut_ptr(),
        _map: map,
        rank,
        world,
        slot_bytes,
        data_offset: data_offset(world),
        peers,
        op_timeout,
        round: 0,
    })
}
