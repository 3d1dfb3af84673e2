//! Shared-memory transport for ranks on one host. Each rank creates one segment (a file under
//! /dev/shm, mapped shared) holding one single-producer/single-consumer byte ring per sender; a
//! sender writes straight into its slot of the receiver's segment and the receiver reduces or
//! copies straight out of it, so a payload is copied once on its way. A peer's death is watched
//! through a pidfd (it becomes readable when the process exits, even before it is reaped), its
//! life through a heartbeat counter beside each ring that the writer bumps and the reader watches.
//!
//! A segment's name lives only as long as it must, so that a rank killed at any point leaves
//! (almost) nothing in /dev/shm: the file is made only when the group connects (after the
//! rendezvous), under a temporary name that is renamed once its header is complete; the header
//! says how many peers will map it, each peer counts itself in once mapped, and the peer that
//! completes the count removes the name at once (the mappings stay valid). The owner removes it
//! too when it is done connecting or dropped, whichever comes first.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use memmap2::{MmapOptions, MmapRaw};

use super::liveness::PidWatch;
use super::{remaining, Endpoint, Pair, Setup, Transport};
use crate::error::{CommError, Result};

const SEG_MAGIC: u64 = 0x3347_4553_4c53_4853; // "SHSLSEG3"
const PAGE: usize = 4096;
/// Default bytes of each ring (override with SHARDLINE_SHM_RING_BYTES).
pub const DEFAULT_RING_BYTES: usize = 2 << 20;

/// Words of the header page: magic, owner's pid, slots, ring bytes, how many peers will map the
/// segment, and how many have.
const H_MAGIC: usize = 0;
const H_PID: usize = 1;
const H_SLOTS: usize = 2;
const H_CAP: usize = 3;
const H_EXPECTED: usize = 4;
const H_MAPPED: usize = 5;

/// This rank's segment: rings in which the peers write to this rank.
pub struct ShmTransport {
    /// The mapping, once the segment is made (by `connect`).
    map: Option<Arc<MmapRaw>>,
    path: PathBuf,
    slots: usize,
    cap: usize,
    /// Whether the name at `path` may still exist and be ours to remove.
    named: bool,
}

fn segment_len(slots: usize, cap: usize) -> usize {
    PAGE + slots * (PAGE + cap)
}

/// Header word `i` of a mapped segment.
///
/// # Safety
/// `map` must be at least one page long.
unsafe fn word(map: &MmapRaw, i: usize) -> &AtomicU64 {
    &*(map.as_ptr() as *const AtomicU64).add(i)
}

impl ShmTransport {
    /// Names a segment with `slots` rings of `cap` bytes (rounded to pages). Nothing is created
    /// until `connect` needs it.
    pub fn create(slots: usize, cap: usize, name_hint: u64) -> Result<ShmTransport> {
        let cap = cap.max(PAGE).div_ceil(PAGE) * PAGE;
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let path = dir.join(format!("shardline-{}-{name_hint:016x}", std::process::id()));
        Ok(ShmTransport {
            map: None,
            path,
            slots,
            cap,
            named: false,
        })
    }

    /// Makes the segment for `expected` peers: a file under a temporary name, sized and mapped,
    /// its header written, then renamed to the published path, so a peer that opens it finds a
    /// complete header.
    fn make(&mut self, expected: usize) -> Result<Arc<MmapRaw>> {
        if let Some(map) = &self.map {
            return Ok(map.clone());
        }
        let path = &self.path;
        let ctx = |e| {
            CommError::io(
                format!("creating shared-memory segment {}", path.display()),
                e,
            )
        };
        let mut tmp = path.clone().into_os_string();
        tmp.push(".new");
        let tmp = PathBuf::from(tmp);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(ctx)?;
        let made = file
            .set_len(segment_len(self.slots, self.cap) as u64)
            .and_then(|_| MmapOptions::new().map_raw(&file));
        let map = match made {
            Ok(map) => map,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(ctx(e));
            }
        };
        // SAFETY: the header page is ours; nobody else knows the temporary name.
        unsafe {
            word(&map, H_PID).store(std::process::id() as u64, Ordering::Relaxed);
            word(&map, H_SLOTS).store(self.slots as u64, Ordering::Relaxed);
            word(&map, H_CAP).store(self.cap as u64, Ordering::Relaxed);
            word(&map, H_EXPECTED).store(expected as u64, Ordering::Relaxed);
            word(&map, H_MAPPED).store(0, Ordering::Relaxed);
            word(&map, H_MAGIC).store(SEG_MAGIC, Ordering::Release);
        }
        if let Err(e) = std::fs::rename(&tmp, path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(ctx(e));
        }
        self.named = true;
        let map = Arc::new(map);
        self.map = Some(map.clone());
        Ok(map)
    }

    /// The path published in the table.
    pub fn address(&self) -> String {
        self.path.display().to_string()
    }

    /// Removes the segment's name (the mappings stay valid); the peers unlink it themselves as
    /// soon as the last of them has mapped it, so this is the fallback.
    pub fn unlink(&mut self) {
        if self.named {
            let _ = std::fs::remove_file(&self.path);
            self.named = false;
        }
    }
}

/// Opens peer `ep`'s segment, waiting (until `setup`'s deadline) while it does not exist yet and
/// its owner lives; `since`: when this rank began to wait for its peers (a segment that has not
/// appeared within the liveness budget from then fails the connection, naming its rank).
fn open_segment(ep: &Endpoint, setup: &Setup, since: Instant) -> Result<File> {
    let watch = PidWatch::new(ep.pid);
    let total = setup
        .deadline
        .saturating_duration_since(Instant::now())
        .as_secs_f64();
    loop {
        match File::options().read(true).write(true).open(&ep.shm) {
            Ok(f) => return Ok(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !watch.alive() {
                    return Err(CommError::PeerLost {
                        rank: ep.world_rank,
                        detail: format!(
                            "process {} exited before its shared-memory segment was made",
                            ep.pid
                        ),
                    });
                }
                if let Some(budget) = setup.silence.filter(|b| since.elapsed() >= *b) {
                    return Err(CommError::Silent {
                        rank: ep.world_rank,
                        secs: since.elapsed().as_secs_f64(),
                        what: format!(
                            "while this rank waited for its shared-memory segment ({}; \
                             SHARDLINE_HEARTBEAT={} s is the budget)",
                            crate::heartbeat::state(Some(ep.pid)),
                            budget.as_secs_f64()
                        ),
                    });
                }
                let left = remaining(
                    setup.deadline,
                    &format!(
                        "waiting for rank {}'s shared-memory segment {}",
                        ep.world_rank, ep.shm
                    ),
                    total,
                )?;
                std::thread::sleep(std::time::Duration::from_millis(1).min(left));
            }
            Err(e) => {
                return Err(CommError::Bootstrap(format!(
                    "shared-memory segment {} of rank {}: {e}",
                    ep.shm, ep.world_rank
                )))
            }
        }
    }
}

impl Transport for ShmTransport {
    fn name(&self) -> &'static str {
        "shm"
    }

    fn reaches(&self, me: &Endpoint, peer: &Endpoint) -> bool {
        me.host == peer.host
    }

    /// Makes this rank's segment, for `peers` to map.
    fn offer(&mut self, _setup: &Setup, peers: &[usize]) -> Result<()> {
        if !peers.is_empty() {
            self.make(peers.len())?;
        }
        Ok(())
    }

    /// Maps every peer's segment (waiting for it to be made) and pairs this rank's ring `p` with
    /// slot `me` of peer `p`.
    fn connect(&mut self, setup: &Setup, peers: &[usize]) -> Result<Vec<(usize, Box<dyn Pair>)>> {
        let (me, table) = (setup.me, setup.table);
        let mut out: Vec<(usize, Box<dyn Pair>)> = Vec::new();
        if peers.is_empty() {
            return Ok(out);
        }
        let own = self.make(peers.len())?;
        let since = Instant::now();
        for &p in peers {
            let ep = &table[p];
            let bad = |why: String| {
                CommError::Bootstrap(format!(
                    "shared-memory segment {} of rank {}: {why}",
                    ep.shm, ep.world_rank
                ))
            };
            let file = open_segment(ep, setup, since)?;
            let len = file.metadata().map_err(|e| bad(e.to_string()))?.len() as usize;
            if len < PAGE {
                return Err(bad(format!("only {len} bytes")));
            }
            let map = MmapOptions::new()
                .map_raw(&file)
                .map_err(|e| bad(e.to_string()))?;
            drop(file);
            // SAFETY: at least one page is mapped; the header words are read atomically.
            let (magic, pid, slots, cap, expected) = unsafe {
                (
                    word(&map, H_MAGIC).load(Ordering::Acquire),
                    word(&map, H_PID).load(Ordering::Relaxed),
                    word(&map, H_SLOTS).load(Ordering::Relaxed) as usize,
                    word(&map, H_CAP).load(Ordering::Relaxed) as usize,
                    word(&map, H_EXPECTED).load(Ordering::Relaxed),
                )
            };
            if magic != SEG_MAGIC || pid != ep.pid as u64 {
                return Err(bad("not a segment of that rank (bad magic or pid)".into()));
            }
            // Counted in: the last peer to map the segment removes its name.
            // SAFETY: as above.
            let mapped = unsafe { word(&map, H_MAPPED).fetch_add(1, Ordering::AcqRel) } + 1;
            if mapped >= expected {
                let _ = std::fs::remove_file(&ep.shm);
            }
            if slots <= me || cap != self.cap || len != segment_len(slots, cap) {
                return Err(bad(format!(
                    "{slots} slots of {cap} bytes in {len} bytes does not fit rank {me}"
                )));
            }
            let pidfd = PidWatch::new(ep.pid);
            let peer_map = Arc::new(map);
            let tx = Ring::new(peer_map.clone(), me, cap);
            let rx = Ring::new(own.clone(), p, cap);
            // Fault the rings' pages in now rather than on the first messages (a first pass
            // through a ring otherwise costs a page fault per 4 KiB). Neither call changes
            // contents, so a peer already writing is not disturbed. Populating the ring this
            // rank writes also allocates it: a full /dev/shm is an error here, not a SIGBUS on
            // the first send. Kernels without these calls (EINVAL) just fault lazily.
            tx.populate(libc::MADV_POPULATE_WRITE).map_err(|e| {
                bad(format!(
                    "cannot allocate the {cap}-byte ring ({e}); is /dev/shm full? \
                     Lower SHARDLINE_SHM_RING_BYTES or use the tcp transport"
                ))
            })?;
            let _ = rx.populate(libc::MADV_POPULATE_READ);
            out.push((
                p,
                Box::new(ShmPair {
                    peer: ep.world_rank,
                    tx,
                    rx,
                    pid: pidfd,
                    beats: 0,
                    seen: (0, 0),
                }),
            ));
        }
        Ok(out)
    }

    /// Every peer has mapped this rank's segment now: its name can go.
    fn connected(&mut self) {
        self.unlink();
    }
}

impl Drop for ShmTransport {
    fn drop(&mut self) {
        self.unlink();
    }
}

/// One direction of a pair: a byte ring inside a mapped segment. Its control page holds the
/// writer's count of bytes written (head), the reader's count of bytes read (tail), and the
/// writer's heartbeat count, each on a cache line of its own.
struct Ring {
    _map: Arc<MmapRaw>,
    head: *const AtomicU64,
    tail: *const AtomicU64,
    beat: *const AtomicU64,
    data: *mut u8,
    cap: usize,
    /// This side's own counter (head for the writer, tail for the reader).
    mine: u64,
    /// Last seen value of the other side's counter.
    theirs: u64,
}

// SAFETY: the raw pointers point into `_map`, which the ring keeps alive; the ring is used by one
// thread at a time (it is moved, never shared).
unsafe impl Send for Ring {}

impl Ring {
    fn new(map: Arc<MmapRaw>, slot: usize, cap: usize) -> Ring {
        // SAFETY: the segment length was checked to hold `slot`.
        unsafe {
            let base = map.as_mut_ptr().add(PAGE + slot * (PAGE + cap));
            Ring {
                head: base as *const AtomicU64,
                tail: base.add(64) as *const AtomicU64,
                beat: base.add(128) as *const AtomicU64,
                data: base.add(PAGE),
                cap,
                mine: 0,
                theirs: 0,
                _map: map,
            }
        }
    }

    fn populate(&self, advice: libc::c_int) -> std::io::Result<()> {
        // SAFETY: the ring's control page and data lie inside the live mapping.
        let r = unsafe { libc::madvise(self.head as *mut libc::c_void, PAGE + self.cap, advice) };
        let err = std::io::Error::last_os_error();
        match r {
            0 => Ok(()),
            _ if err.raw_os_error() == Some(libc::EINVAL) => Ok(()),
            _ => Err(err),
        }
    }

    fn write(&mut self, parts: &[&[u8]]) -> usize {
        let want: usize = parts.iter().map(|p| p.len()).sum();
        let cap = self.cap as u64;
        if self.mine - self.theirs + (want as u64) > cap {
            // SAFETY: `tail` points into the live mapping.
            self.theirs = unsafe { (*self.tail).load(Ordering::Acquire) };
        }
        let mut free = (cap - (self.mine - self.theirs)) as usize;
        let mut written = 0;
        for part in parts {
            let n = part.len().min(free);
            let mut done = 0;
            while done < n {
                let at = ((self.mine + (written + done) as u64) % cap) as usize;
                let m = (n - done).min(self.cap - at);
                // SAFETY: `at + m <= cap`, inside this ring's data area.
                unsafe {
                    std::ptr::copy_nonoverlapping(part.as_ptr().add(done), self.data.add(at), m)
                };
                done += m;
            }
            written += n;
            free -= n;
            if n < part.len() {
                break;
            }
        }
        if written > 0 {
            self.mine += written as u64;
            // SAFETY: as above; Release publishes the copied bytes.
            unsafe { (*self.head).store(self.mine, Ordering::Release) };
        }
        written
    }

    fn read(&mut self, max: usize, align: usize, consume: &mut dyn FnMut(&[u8])) -> usize {
        if self.theirs - self.mine < max.min(align) as u64 || self.theirs == self.mine {
            // SAFETY: `head` points into the live mapping; Acquire pairs with the writer.
            self.theirs = unsafe { (*self.head).load(Ordering::Acquire) };
        }
        let at = (self.mine % self.cap as u64) as usize;
        let avail = ((self.theirs - self.mine) as usize)
            .min(self.cap - at)
            .min(max);
        let n = if avail == max {
            avail
        } else {
            avail - avail % align
        };
        if n == 0 {
            return 0;
        }
        // SAFETY: the writer published these bytes and will not touch them until `tail` moves.
        consume(unsafe { std::slice::from_raw_parts(self.data.add(at), n) });
        self.mine += n as u64;
        // SAFETY: as above; Release hands the space back after the bytes were read.
        unsafe { (*self.tail).store(self.mine, Ordering::Release) };
        n
    }
}

/// One peer over shared memory.
pub struct ShmPair {
    peer: usize,
    tx: Ring,
    rx: Ring,
    pid: PidWatch,
    /// Heartbeats this rank has given the peer.
    beats: u64,
    /// The peer's bytes written and heartbeat count when `heard` last looked.
    seen: (u64, u64),
}

impl Pair for ShmPair {
    fn try_write(&mut self, parts: &[&[u8]]) -> Result<usize> {
        Ok(self.tx.write(parts))
    }

    fn try_read_with(
        &mut self,
        max: usize,
        align: usize,
        consume: &mut dyn FnMut(&[u8]),
    ) -> Result<usize> {
        Ok(self.rx.read(max, align, consume))
    }

    fn sent(&self) -> u64 {
        self.tx.mine.wrapping_add(self.beats)
    }

    fn beat(&mut self, _between_frames: bool) -> Result<bool> {
        // Out of band: a counter beside the ring, so a half-sent frame does not hold it up.
        self.beats += 1;
        // SAFETY: `beat` points into the live mapping of the peer's segment.
        unsafe { (*self.tx.beat).store(self.beats, Ordering::Relaxed) };
        Ok(true)
    }

    fn heard(&mut self, _between_frames: bool) -> Result<bool> {
        // SAFETY: both words lie in this rank's own live segment.
        let now = unsafe {
            (
                (*self.rx.head).load(Ordering::Acquire),
                (*self.rx.beat).load(Ordering::Relaxed),
            )
        };
        let new = now != self.seen;
        self.seen = now;
        Ok(new)
    }

    fn check_alive(&mut self) -> Result<()> {
        if self.pid.alive() {
            Ok(())
        } else {
            Err(CommError::PeerLost {
                rank: self.peer,
                detail: format!("process {} exited (shm)", self.pid.pid()),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_wraps_and_respects_alignment_and_capacity() {
        let mut seg = ShmTransport::create(1, PAGE, 0xdead_0001).unwrap();
        let map = seg.make(0).unwrap();
        let mut w = Ring::new(map.clone(), 0, seg.cap);
        let mut r = Ring::new(map, 0, seg.cap);
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let (mut sent, mut got) = (0, Vec::new());
        let mut rounds = 0;
        while got.len() < data.len() {
            let n = w.write(&[&data[sent..(sent + 3000).min(data.len())]]);
            assert!(w.mine - r.mine <= PAGE as u64, "writer overran the reader");
            sent += n;
            r.read(usize::MAX, 4, &mut |b| {
                assert!(b.len() % 4 == 0 || got.len() + b.len() == data.len());
                got.extend_from_slice(b)
            });
            rounds += 1;
            assert!(rounds < 100, "ring made no progress");
        }
        assert_eq!(got, data);
    }
}
