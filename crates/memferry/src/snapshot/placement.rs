//! Where each allocation's bytes go at rest: shards of balanced size,
//! striped round-robin across roots, every extent 4096-aligned.

use crate::units::align_up;

/// An extent placed in a shard (checksums come later).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    /// Shard index.
    pub shard: usize,
    /// Offset in the shard (aligned).
    pub offset: u64,
    /// Payload bytes.
    pub length: u64,
    /// Offset in the allocation.
    pub alloc_offset: u64,
}

/// The result of placement.
#[derive(Debug, Clone, Default)]
pub struct Placement {
    /// Size of each shard (aligned); shard `i` lives on root `i % roots`.
    pub shard_sizes: Vec<u64>,
    /// Extents per allocation, in allocation order.
    pub extents: Vec<Vec<Placed>>,
}

/// Places allocations of `sizes` into shards of at most `shard_size` bytes
/// (rounded to `align`) over `roots` roots. Shards come out of nearly equal
/// size and their count is a multiple of `roots` whenever there are enough
/// bytes, so every disk gets the same share. Large allocations are split.
pub fn place(sizes: &[u64], shard_size: u64, roots: usize, align: u64) -> Placement {
    let roots = roots.max(1) as u64;
    let shard_size = align_up(shard_size.max(align), align);
    let padded: u64 = sizes.iter().map(|&s| align_up(s, align)).sum();
    if padded == 0 {
        return Placement {
            shard_sizes: Vec::new(),
            extents: vec![Vec::new(); sizes.len()],
        };
    }
    let mut count = padded.div_ceil(shard_size);
    count = count.div_ceil(roots) * roots;
    count = count.min(padded / align).max(1);
    let target = align_up(padded.div_ceil(count), align);

    let mut shard_sizes = vec![0u64];
    let mut extents = Vec::with_capacity(sizes.len());
    for &size in sizes {
        let mut list = Vec::new();
        let mut done = 0;
        while done < size {
            let cur = shard_sizes.len() - 1;
            let room = target - shard_sizes[cur];
            if room == 0 {
                shard_sizes.push(0);
                continue;
            }
            let n = (size - done).min(room);
            list.push(Placed {
                shard: cur,
                offset: shard_sizes[cur],
                length: n,
                alloc_offset: done,
            });
            shard_sizes[cur] += align_up(n, align);
            done += n;
        }
        extents.push(list);
    }
    if shard_sizes.last() == Some(&0) {
        shard_sizes.pop();
    }
    Placement {
        shard_sizes,
        extents,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balances_and_splits() {
        let sizes = [0, 10 << 20, 5, 4097, 3 << 20];
        let p = place(&sizes, 4 << 20, 2, 4096);
        assert_eq!(p.shard_sizes.len() % 2, 0);
        let max = *p.shard_sizes.iter().max().unwrap();
        let min = *p.shard_sizes.iter().min().unwrap();
        assert!(max - min <= 3 * 4096 * 2, "{:?}", p.shard_sizes);
        assert!(p.extents[0].is_empty());
        assert!(p.extents[1].len() >= 3, "large allocation split");
        for (size, ext) in sizes.iter().zip(&p.extents) {
            assert_eq!(ext.iter().map(|e| e.length).sum::<u64>(), *size);
            for e in ext {
                assert_eq!(e.offset % 4096, 0);
                assert_eq!(e.alloc_offset % 4096, 0);
            }
        }
    }

    #[test]
    fn tiny_data_makes_one_shard() {
        let p = place(&[7], 1 << 30, 4, 4096);
        assert_eq!(p.shard_sizes, vec![4096]);
    }
}
