//! A registration cache: memory regions registered with a transport (UCX's `ucp_mem_map`) once
//! and reused for every transfer from or into them, keyed by address range, bounded (least
//! recently used entries are unregistered first) and invalidated by the memory's owner when it
//! frees the memory. Generic over a [`Registrar`], so that the bookkeeping is tested without UCX.
//!
//! Only memory whose owner tells the cache when it is freed may be cached: a registration outlives
//! the allocation it was made for, and memory allocated again at the same address (other pages,
//! other data) would otherwise be served the old registration. Registrations are shared (`Arc`):
//! one in use by a transfer stays registered until the transfer lets go of it, even when the cache
//! has evicted or invalidated it meanwhile.

use std::collections::BTreeMap;
use std::sync::Arc;

/// Registers and unregisters memory with a transport.
pub(crate) trait Registrar: Send + Sync {
    /// What a registration is known by (UCX: a `ucp_mem_h`).
    type Handle: Send + Sync;
    /// Why a registration failed.
    type Error;
    /// Registers `len` bytes at `addr`.
    fn register(&self, addr: usize, len: usize) -> Result<Self::Handle, Self::Error>;
    /// Unregisters what `register` returned; called once per handle.
    fn unregister(&self, handle: &Self::Handle);
}

/// One registered region; unregistered when the last user (the cache or a transfer) drops it.
pub(crate) struct Registration<R: Registrar> {
    addr: usize,
    len: usize,
    handle: R::Handle,
    registrar: Arc<R>,
}

impl<R: Registrar> Registration<R> {
    pub fn handle(&self) -> &R::Handle {
        &self.handle
    }

    fn overlaps(&self, addr: usize, len: usize) -> bool {
        addr < self.addr + self.len && self.addr < addr + len
    }
}

impl<R: Registrar> Drop for Registration<R> {
    fn drop(&mut self) {
        self.registrar.unregister(&self.handle);
    }
}

struct Entry<R: Registrar> {
    reg: Arc<Registration<R>>,
    /// The cache's clock when the entry was last used (larger: more recent).
    used: u64,
}

/// How the cache has been used (for logs and tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub invalidations: u64,
}

/// Registrations by start address; the cached ranges never overlap.
pub(crate) struct RegCache<R: Registrar> {
    registrar: Arc<R>,
    entries: BTreeMap<usize, Entry<R>>,
    max_entries: usize,
    max_bytes: usize,
    bytes: usize,
    clock: u64,
    stats: CacheStats,
}

impl<R: Registrar> RegCache<R> {
    /// A cache of at most `max_entries` registrations covering at most `max_bytes` together
    /// (the newest registration stays even when it alone is larger).
    pub fn new(registrar: Arc<R>, max_entries: usize, max_bytes: usize) -> RegCache<R> {
        RegCache {
            registrar,
            entries: BTreeMap::new(),
            max_entries: max_entries.max(1),
            max_bytes,
            bytes: 0,
            clock: 0,
            stats: CacheStats::default(),
        }
    }

    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// A registration covering `len` bytes at `addr`: a cached one, or a new one (which replaces
    /// cached ranges that overlap it, then evicts the least recently used beyond the bounds).
    pub fn get(&mut self, addr: usize, len: usize) -> Result<Arc<Registration<R>>, R::Error> {
        self.clock += 1;
        let end = addr.saturating_add(len);
        if let Some((_, e)) = self.entries.range_mut(..=addr).next_back() {
            if e.reg.addr + e.reg.len >= end {
                e.used = self.clock;
                self.stats.hits += 1;
                return Ok(e.reg.clone());
            }
        }
        self.stats.misses += 1;
        let handle = self.registrar.register(addr, len)?;
        self.remove_overlapping(addr, len);
        let reg = Arc::new(Registration {
            addr,
            len,
            handle,
            registrar: self.registrar.clone(),
        });
        self.bytes += len;
        self.entries.insert(
            addr,
            Entry {
                reg: reg.clone(),
                used: self.clock,
            },
        );
        while self.entries.len() > self.max_entries
            || (self.bytes > self.max_bytes && self.entries.len() > 1)
        {
            let oldest = self
                .entries
                .iter()
                .filter(|(&a, _)| a != addr)
                .min_by_key(|(_, e)| e.used)
                .map(|(&a, _)| a);
            let Some(oldest) = oldest else { break };
            self.drop_entry(oldest);
            self.stats.evictions += 1;
        }
        Ok(reg)
    }

    /// The cached registration covering `len` bytes at `addr`, if there is one (nothing is
    /// registered): for memory whose owner registers it and releases it when it goes.
    pub fn find(&mut self, addr: usize, len: usize) -> Option<Arc<Registration<R>>> {
        self.clock += 1;
        let end = addr.saturating_add(len);
        let (_, e) = self.entries.range_mut(..=addr).next_back()?;
        if e.reg.addr + e.reg.len < end {
            return None;
        }
        e.used = self.clock;
        self.stats.hits += 1;
        Some(e.reg.clone())
    }

    /// Forgets every registration that overlaps `len` bytes at `addr`, because their owner frees
    /// (or has freed) that memory; returns how many there were. Each is unregistered now, or when
    /// the last transfer using it lets go.
    pub fn invalidate(&mut self, addr: usize, len: usize) -> usize {
        let n = self.remove_overlapping(addr, len);
        self.stats.invalidations += n as u64;
        n
    }

    fn remove_overlapping(&mut self, addr: usize, len: usize) -> usize {
        // Ranges do not overlap each other, so the candidates are the last one starting at or
        // before `addr` and those starting inside the range.
        let end = addr.saturating_add(len);
        let doomed: Vec<usize> = self
            .entries
            .range(..end)
            .rev()
            .take_while(|(&a, e)| a >= addr || e.reg.overlaps(addr, len))
            .filter(|(_, e)| e.reg.overlaps(addr, len))
            .map(|(&a, _)| a)
            .collect();
        for &a in &doomed {
            self.drop_entry(a);
        }
        doomed.len()
    }

    fn drop_entry(&mut self, addr: usize) {
        if let Some(e) = self.entries.remove(&addr) {
            self.bytes -= e.reg.len;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Hands out numbered handles and records what is registered.
    #[derive(Default)]
    struct Fake {
        next: Mutex<u64>,
        live: Mutex<Vec<(u64, usize, usize)>>,
        unregistered: Mutex<Vec<u64>>,
        fail: Mutex<bool>,
    }

    impl Registrar for Fake {
        type Handle = u64;
        type Error = &'static str;
        fn register(&self, addr: usize, len: usize) -> Result<u64, &'static str> {
            if *self.fail.lock().unwrap() {
                return Err("refused");
            }
            let mut next = self.next.lock().unwrap();
            *next += 1;
            self.live.lock().unwrap().push((*next, addr, len));
            Ok(*next)
        }
        fn unregister(&self, handle: &u64) {
            self.live.lock().unwrap().retain(|(h, _, _)| h != handle);
            self.unregistered.lock().unwrap().push(*handle);
        }
    }

    impl Fake {
        fn live(&self) -> Vec<u64> {
            self.live.lock().unwrap().iter().map(|l| l.0).collect()
        }
    }

    fn cache(entries: usize, bytes: usize) -> (Arc<Fake>, RegCache<Fake>) {
        let fake = Arc::new(Fake::default());
        (fake.clone(), RegCache::new(fake, entries, bytes))
    }

    #[test]
    fn find_returns_a_covering_registration_and_never_registers() {
        let (fake, mut c) = cache(8, 1 << 30);
        let a = *c.get(0x1000, 0x1000).unwrap().handle();
        assert_eq!(c.find(0x1800, 0x800).map(|r| *r.handle()), Some(a));
        assert!(c.find(0x1800, 0x801).is_none(), "past the end");
        assert!(c.find(0x800, 0x100).is_none(), "below the start");
        assert_eq!(fake.live(), vec![a]);
        assert_eq!((c.stats().hits, c.stats().misses), (1, 1));
        c.invalidate(0x1000, 0x1000);
        assert!(c.find(0x1000, 0x10).is_none(), "released");
    }

    #[test]
    fn a_range_inside_a_registration_hits_and_one_beyond_it_registers() {
        let (fake, mut c) = cache(8, 1 << 30);
        let a = *c.get(0x1000, 0x1000).unwrap().handle();
        assert_eq!(*c.get(0x1800, 0x100).unwrap().handle(), a);
        assert_eq!(*c.get(0x1000, 0x1000).unwrap().handle(), a);
        assert_eq!(c.stats().hits, 2);
        // Reaching past the end: a new registration of the whole range replaces the old one.
        let b = *c.get(0x1000, 0x2000).unwrap().handle();
        assert_ne!(a, b);
        assert_eq!(fake.live(), vec![b]);
        assert_eq!(*fake.unregistered.lock().unwrap(), vec![a]);
        // Below the start misses too.
        let d = *c.get(0x800, 0x100).unwrap().handle();
        assert_ne!(d, b);
        assert_eq!(c.stats().misses, 3);
    }

    #[test]
    fn the_least_recently_used_registration_is_evicted_and_unregistered() {
        let (fake, mut c) = cache(2, 1 << 30);
        let a = *c.get(0x1000, 0x100).unwrap().handle();
        let b = *c.get(0x2000, 0x100).unwrap().handle();
        c.get(0x1000, 0x100).unwrap(); // a is now the more recent
        let d = *c.get(0x3000, 0x100).unwrap().handle();
        assert_eq!(fake.live(), vec![a, d], "b, the least recently used, goes");
        assert_eq!(*fake.unregistered.lock().unwrap(), vec![b]);
        assert_eq!(c.stats().evictions, 1);
        // The byte bound evicts too, but keeps the newest even when it alone is too big.
        let (fake, mut c) = cache(8, 0x300);
        c.get(0x1000, 0x200).unwrap();
        c.get(0x2000, 0x200).unwrap();
        assert_eq!(fake.live().len(), 1);
        let big = *c.get(0x4000, 0x1000).unwrap().handle();
        assert_eq!(fake.live(), vec![big]);
    }

    #[test]
    fn memory_freed_and_allocated_again_at_the_same_address_is_registered_again() {
        let (fake, mut c) = cache(8, 1 << 30);
        let old = *c.get(0x7000, 0x1000).unwrap().handle();
        assert_eq!(*c.get(0x7000, 0x1000).unwrap().handle(), old);
        // The owner frees it: the registration goes at once (nothing else uses it).
        assert_eq!(c.invalidate(0x7000, 0x1000), 1);
        assert_eq!(fake.live(), Vec::<u64>::new());
        assert_eq!(*fake.unregistered.lock().unwrap(), vec![old]);
        // Same address, same length, new memory: never the stale handle.
        let new = *c.get(0x7000, 0x1000).unwrap().handle();
        assert_ne!(new, old);
        assert_eq!(fake.live(), vec![new]);
        assert_eq!(c.stats().misses, 2);
        assert_eq!(c.stats().invalidations, 1);
        // Invalidating memory never registered is no error and touches nothing.
        assert_eq!(c.invalidate(0x9000, 0x10), 0);
        assert_eq!(fake.live(), vec![new]);
    }

    #[test]
    fn a_registration_in_use_outlives_its_eviction_and_invalidation() {
        let (fake, mut c) = cache(1, 1 << 30);
        let in_flight = c.get(0x1000, 0x100).unwrap();
        let h = *in_flight.handle();
        c.get(0x2000, 0x100).unwrap(); // evicts the first from the cache
        assert!(fake.live().contains(&h), "still used by a transfer");
        c.invalidate(0x2000, 0x100);
        drop(in_flight);
        assert!(!fake.live().contains(&h));
        assert!(fake.live().is_empty());
    }

    #[test]
    fn invalidation_removes_every_overlapping_range_and_only_those() {
        let (fake, mut c) = cache(8, 1 << 30);
        let a = *c.get(0x1000, 0x1000).unwrap().handle();
        let b = *c.get(0x2000, 0x1000).unwrap().handle();
        let d = *c.get(0x4000, 0x1000).unwrap().handle();
        assert_eq!(c.invalidate(0x1800, 0x1000), 2);
        assert_eq!(fake.live(), vec![d]);
        assert!(fake.unregistered.lock().unwrap().contains(&a));
        assert!(fake.unregistered.lock().unwrap().contains(&b));
    }

    #[test]
    fn a_failed_registration_leaves_the_cache_as_it_was() {
        let (fake, mut c) = cache(8, 1 << 30);
        let a = *c.get(0x1000, 0x100).unwrap().handle();
        *fake.fail.lock().unwrap() = true;
        assert_eq!(c.get(0x1000, 0x200).err(), Some("refused"));
        assert_eq!(*c.get(0x1000, 0x100).unwrap().handle(), a);
        assert_eq!(fake.live(), vec![a]);
    }
}
