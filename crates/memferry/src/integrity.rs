//! Checksums: CRC32C (Castagnoli) over fixed-size chunks of every extent.
//!
//! An extent of `len` bytes carries `ceil(len / chunk)` checksums; chunk `i`
//! covers bytes `i*chunk .. min((i+1)*chunk, len)` of the extent. Because the
//! chunk size is fixed per snapshot, any I/O request that covers whole chunks
//! can be verified the moment it completes, in the same pass.

use crc_fast::CrcAlgorithm;

/// Default checksum granularity: 1 MiB.
pub const DEFAULT_CHUNK: u64 = 1 << 20;

/// CRC32C of `data`.
///
/// ```
/// assert_eq!(memferry::integrity::crc32c(b"123456789"), 0xe306_9283);
/// ```
pub fn crc32c(data: &[u8]) -> u32 {
    crc_fast::checksum(CrcAlgorithm::Crc32Iscsi, data) as u32
}

/// A running CRC32C for data that arrives in pieces (`update` each piece,
/// then `finalize`): the same checksum as [`crc32c`] over their
/// concatenation.
pub fn crc32c_digest() -> crc_fast::Digest {
    crc_fast::Digest::new(CrcAlgorithm::Crc32Iscsi)
}

/// Number of checksums an extent of `len` bytes carries.
pub fn chunk_count(len: u64, chunk: u64) -> usize {
    len.div_ceil(chunk) as usize
}

/// Computes the chunk checksums of `data` into `out` (one per chunk).
pub fn checksum_chunks(data: &[u8], chunk: u64, out: &mut [u32]) {
    debug_assert_eq!(out.len(), chunk_count(data.len() as u64, chunk));
    for (slot, piece) in out.iter_mut().zip(data.chunks(chunk as usize)) {
        *slot = crc32c(piece);
    }
}

/// Checks `data` against `expected` chunk checksums; on mismatch returns the
/// index of the first bad chunk and the checksum found.
pub fn verify_chunks(data: &[u8], chunk: u64, expected: &[u32]) -> Result<(), (usize, u32)> {
    debug_assert_eq!(expected.len(), chunk_count(data.len() as u64, chunk));
    for (i, (piece, want)) in data.chunks(chunk as usize).zip(expected).enumerate() {
        let got = crc32c(piece);
        if got != *want {
            return Err((i, got));
        }
    }
    Ok(())
}

/// Like [`verify_chunks`], over data held in several pieces (e.g. the
/// chunks of a network body) without first joining them.
pub fn verify_chunks_of_pieces(
    pieces: &[&[u8]],
    chunk: u64,
    expected: &[u32],
) -> Result<(), (usize, u32)> {
    let mut digest = crc32c_digest();
    let mut filled = 0u64;
    let mut index = 0;
    let check = |digest: &mut crc_fast::Digest, index: &mut usize| {
        let got = digest.finalize_reset() as u32;
        let want = expected.get(*index).copied();
        *index += 1;
        if want == Some(got) {
            Ok(())
        } else {
            Err((*index - 1, got))
        }
    };
    for piece in pieces {
        let mut rest = *piece;
        while !rest.is_empty() {
            let take = ((chunk - filled) as usize).min(rest.len());
            digest.update(&rest[..take]);
            filled += take as u64;
            rest = &rest[take..];
            if filled == chunk {
                check(&mut digest, &mut index)?;
                filled = 0;
            }
        }
    }
    if filled > 0 {
        check(&mut digest, &mut index)?;
    }
    debug_assert_eq!(index, expected.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector() {
        // RFC 3720 test vector for CRC32C.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn pieces_verify_like_one_buffer() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 13) as u8).collect();
        let mut sums = vec![0; chunk_count(10_000, 4096)];
        checksum_chunks(&data, 4096, &mut sums);
        let split = |cuts: &[usize]| -> Vec<&[u8]> {
            let mut out = Vec::new();
            let mut at = 0;
            for &c in cuts.iter().chain([&data.len()]) {
                out.push(&data[at..c]);
                at = c;
            }
            out
        };
        for cuts in [&[][..], &[1, 4096, 4097, 9000][..], &[4095, 8192][..]] {
            assert_eq!(verify_chunks_of_pieces(&split(cuts), 4096, &sums), Ok(()));
        }
        let mut bad = data.clone();
        bad[5000] ^= 1;
        let pieces = [&bad[..3000], &bad[3000..]];
        assert_eq!(
            verify_chunks_of_pieces(&pieces, 4096, &sums).map_err(|e| e.0),
            Err(1)
        );
    }

    #[test]
    fn chunked_verification_finds_the_bad_chunk() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let mut sums = vec![0; chunk_count(10_000, 4096)];
        checksum_chunks(&data, 4096, &mut sums);
        assert_eq!(sums.len(), 3);
        assert!(verify_chunks(&data, 4096, &sums).is_ok());
        let mut bad = data.clone();
        bad[9_000] ^= 1;
        assert_eq!(verify_chunks(&bad, 4096, &sums).unwrap_err().0, 2);
    }
}
