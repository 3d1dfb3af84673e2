//! The paged KV cache's bookkeeping: a pool of fixed-size blocks (each `BLOCK_POSITIONS`
//! positions of every layer's keys and values) handed out to sequences, and the block table of a
//! sequence. The storage itself lives in the backend, indexed by block id; this module only says
//! which blocks are free and which positions of a sequence sit in which block (vLLM's block
//! manager, without prefix sharing).

use crate::error::{ModelError, Result};

/// Positions one block holds.
pub const BLOCK_POSITIONS: usize = 16;

/// The free blocks of a pool of `total` blocks.
#[derive(Debug)]
pub struct KvPool {
    total: usize,
    /// Free block ids; the most recently freed is handed out first (it is likely in cache).
    free: Vec<u32>,
}

/// The blocks a sequence holds, in position order: position `p` is in `blocks[p / BLOCK_POSITIONS]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockTable {
    /// Block ids of the pool.
    pub blocks: Vec<u32>,
}

impl BlockTable {
    /// Positions the table's blocks hold.
    pub fn capacity(&self) -> usize {
        self.blocks.len() * BLOCK_POSITIONS
    }
}

/// Blocks needed for `positions` positions.
pub fn blocks_for(positions: usize) -> usize {
    positions.div_ceil(BLOCK_POSITIONS)
}

impl KvPool {
    /// A pool of `total` blocks, all free.
    pub fn new(total: usize) -> KvPool {
        KvPool {
            total,
            free: (0..total as u32).rev().collect(),
        }
    }

    /// Blocks in the pool.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Blocks not held by any sequence.
    pub fn free(&self) -> usize {
        self.free.len()
    }

    /// Grows `table` to hold `positions` positions; fails, taking nothing, when the pool has too
    /// few free blocks.
    pub fn reserve(&mut self, table: &mut BlockTable, positions: usize) -> Result<()> {
        let need = blocks_for(positions).saturating_sub(table.blocks.len());
        if need > self.free.len() {
            return Err(ModelError::KvFull {
                needed: positions,
                capacity: table.capacity() + self.free.len() * BLOCK_POSITIONS,
            });
        }
        let at = self.free.len() - need;
        table.blocks.extend(self.free.drain(at..).rev());
        Ok(())
    }

    /// Gives every block of `table` back.
    pub fn release(&mut self, table: &mut BlockTable) {
        self.free.extend(table.blocks.drain(..).rev());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_handed_out_and_all_come_back() {
        let mut pool = KvPool::new(8);
        let (mut a, mut b) = (BlockTable::default(), BlockTable::default());
        pool.reserve(&mut a, 17).unwrap();
        assert_eq!(a.blocks.len(), 2);
        pool.reserve(&mut a, 32).unwrap();
        assert_eq!(a.blocks.len(), 2, "32 positions fit in two blocks");
        pool.reserve(&mut b, 16 * 6).unwrap();
        assert_eq!(pool.free(), 0);
        let err = pool.reserve(&mut a, 33).unwrap_err();
        assert!(matches!(err, ModelError::KvFull { .. }), "{err}");
        assert_eq!(a.blocks.len(), 2, "a failed reserve takes nothing");
        let mut all: Vec<u32> = a.blocks.iter().chain(&b.blocks).copied().collect();
        all.sort_unstable();
        assert_eq!(
            all,
            (0..8).collect::<Vec<_>>(),
            "no block is handed out twice"
        );
        pool.release(&mut a);
        pool.release(&mut b);
        assert_eq!(pool.free(), 8);
        assert!(a.blocks.is_empty() && b.blocks.is_empty());
    }
}
