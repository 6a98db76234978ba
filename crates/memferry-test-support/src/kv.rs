//! KV store fixtures: namespaces, host tensors filled with a pattern, and
//! reading job results.

use std::sync::Arc;
use std::time::Duration;

use memferry::kv::{JobId, JobResult, KeyOutcome, KvLayout, KvStore, KvTensor, Namespace};
use memferry::memory::{HostRegion, Region};

/// The namespace the tests use: `model` with `blocks_per_file` blocks per
/// file, 16 tokens per block, bfloat16, a single rank (tp 0/1, pp 0/1),
/// layout version 1. Equal arguments give equal namespaces.
pub fn namespace(model: &str, blocks_per_file: u32) -> Namespace {
    Namespace {
        model: model.into(),
        tokens_per_block: 16,
        blocks_per_file,
        tp_rank: 0,
        tp_size: 1,
        pp_rank: 0,
        pp_size: 1,
        dtype: "bfloat16".into(),
        layout_version: 1,
    }
}

/// Fills `buf` with the pattern of (`seed`, tensor `t`, block `b`): an
/// xorshift stream, so different triples give different bytes and the same
/// triple always the same bytes.
pub fn fill_page(buf: &mut [u8], seed: u64, t: u64, b: u64) {
    let mut x = seed
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(t * 1000 + b + 1);
    for byte in buf {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *byte = x as u8;
    }
}

/// One host tensor of `blocks` pages per entry of `pages` (its page size),
/// and the regions behind them (to compare pages with [`page`]). Every
/// page holds [`fill_page`]'s pattern of (`seed`, tensor, block), so equal
/// seeds give equal tensors and no two pages (below block 1000) start from
/// the same generator state; seed 0 leaves the memory zeroed (a
/// destination).
pub fn tensors(seed: u64, pages: &[u64], blocks: u64) -> (KvLayout, Vec<Arc<HostRegion>>) {
    let mut regions = Vec::new();
    let mut list = Vec::new();
    for (t, &page) in pages.iter().enumerate() {
        let mut r = HostRegion::new(blocks * page).unwrap();
        if seed != 0 {
            for b in 0..blocks {
                fill_page(
                    &mut r.as_mut_slice()[(b * page) as usize..((b + 1) * page) as usize],
                    seed,
                    t as u64,
                    b,
                );
            }
        }
        let r = Arc::new(r);
        regions.push(r.clone());
        list.push(KvTensor {
            region: r,
            num_blocks: blocks,
            page_bytes: page,
        });
    }
    (KvLayout::new(list).unwrap(), regions)
}

/// Page `block` of tensor `t` of [`tensors`]' regions, made with `blocks`
/// blocks per tensor.
pub fn page(regions: &[Arc<HostRegion>], blocks: u64, t: usize, block: u64) -> &[u8] {
    let p = (regions[t].len() / blocks) as usize;
    &regions[t].as_slice()[block as usize * p..(block as usize + 1) * p]
}

/// Waits up to 60 s for `job` and returns its result; panics if it has not
/// finished by then.
pub fn wait_one(store: &KvStore, job: JobId) -> JobResult {
    let mut r = store.wait(&[job], Duration::from_secs(60));
    assert_eq!(r.len(), 1, "job {job} did not finish within 60 s");
    r.remove(0)
}

/// The outcome of every key of `r`, in the job's key order.
pub fn outcomes(r: &JobResult) -> Vec<KeyOutcome> {
    r.keys.iter().map(|k| k.outcome.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_hold_the_pattern_per_page_and_seed_zero_is_zeroed() {
        let pages = [8192, 3000];
        let (layout, regions) = tensors(7, &pages, 4);
        assert_eq!(layout.num_blocks(), 4);
        assert_eq!(layout.page_bytes(), pages.to_vec());
        let mut seen = Vec::new();
        for (t, &p) in pages.iter().enumerate() {
            for b in 0..4 {
                let mut want = vec![0u8; p as usize];
                fill_page(&mut want, 7, t as u64, b);
                let got = page(&regions, 4, t, b);
                assert_eq!(got, &want[..], "tensor {t} block {b}");
                seen.push(got[..64].to_vec());
            }
        }
        let n = seen.len();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), n, "two pages start with the same bytes");
        let (_, again) = tensors(7, &pages, 4);
        assert!(again[1].as_slice() == regions[1].as_slice());
        let (_, zero) = tensors(0, &pages, 4);
        assert!(zero.iter().all(|r| r.as_slice().iter().all(|&b| b == 0)));
    }
}
