//! The machine's memory read bandwidth: the bound of decoding, which reads every weight matrix
//! once per token.
//!
//! A [`ReadProbe`] streams a buffer far larger than the CPU's caches with the engine's thread
//! count, each thread reading its contiguous share in address order (as the matrix kernels
//! read theirs), and reports the median and best rate. `mistrald bench --bandwidth` samples it
//! between decoded tokens, so decode speed can be stated as a fraction of what the memory
//! delivered at that time: on shared machines the available bandwidth moves by a factor of two
//! within a minute, so a bound measured at another time says little.
//!
//! The buffer must be large enough that no part of it is still cached when a pass comes back
//! to it: decode reads gigabytes of fresh memory per token. Measured on Zen 4 (32 MiB L3):
//! passes over one 128 MiB buffer with these 128-bit loads ran 1.11-1.16x as fast as reads of
//! fresh memory (the L3 kept part of the buffer across passes; passes that each read a new
//! 128 MiB region of a larger buffer: 1.03x), while 512 MiB and 1 GiB buffers read at the rate
//! of fresh memory (BENCHMARKS.md §7). Hence [`default_probe_bytes`].
use std::time::Duration;

use super::bench::time_parallel;
use super::matmul::Aligned;

/// One measurement of the read bandwidth.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ReadBandwidth {
    /// Threads that read (each its contiguous share of the buffer).
    pub threads: usize,
    /// Bytes read per pass.
    pub bytes: usize,
    /// Median rate over the passes, in GB/s (10⁹ bytes per second).
    pub median_gbs: f64,
    /// Fastest pass, in GB/s.
    pub best_gbs: f64,
}

/// The wrapping sum of the 64-bit words of `bytes` (the bytes of its unaligned ends added one
/// by one), read a cache line at a time with vector loads; the result only keeps the loads
/// from being removed. Explicit 128-bit vectors (SSE2, NEON: part of the base instruction
/// sets): left to itself the compiler vectorizes across lines with gathers, at a sixth of
/// the speed.
pub(crate) fn sum_lines(bytes: &[u8]) -> u64 {
    // SAFETY: any bytes are valid u64 words; align_to splits off the unaligned ends.
    let (head, lines, tail) = unsafe { bytes.align_to::<[u64; 8]>() };
    let ends: u64 = head.iter().chain(tail).map(|&b| u64::from(b)).sum();
    ends.wrapping_add(sum_words(lines))
}

#[cfg(target_arch = "x86_64")]
fn sum_words(lines: &[[u64; 8]]) -> u64 {
    use std::arch::x86_64::{
        __m128i, _mm_add_epi64, _mm_loadu_si128, _mm_setzero_si128, _mm_storeu_si128,
    };
    // SAFETY: SSE2 is part of x86-64; every load reads 16 bytes inside a line of the slice.
    unsafe {
        let mut acc = [_mm_setzero_si128(); 4];
        for line in lines {
            let p = line.as_ptr().cast::<__m128i>();
            for (i, a) in acc.iter_mut().enumerate() {
                *a = _mm_add_epi64(*a, _mm_loadu_si128(p.add(i)));
            }
        }
        let s = _mm_add_epi64(_mm_add_epi64(acc[0], acc[1]), _mm_add_epi64(acc[2], acc[3]));
        let mut out = [0u64; 2];
        _mm_storeu_si128(out.as_mut_ptr().cast(), s);
        out[0].wrapping_add(out[1])
    }
}

#[cfg(target_arch = "aarch64")]
fn sum_words(lines: &[[u64; 8]]) -> u64 {
    use std::arch::aarch64::{vaddq_u64, vaddvq_u64, vdupq_n_u64, vld1q_u64};
    // SAFETY: NEON is part of aarch64; every load reads 16 bytes inside a line of the slice.
    unsafe {
        let mut acc = [vdupq_n_u64(0); 4];
        for line in lines {
            for (i, a) in acc.iter_mut().enumerate() {
                *a = vaddq_u64(*a, vld1q_u64(line.as_ptr().add(2 * i)));
            }
        }
        vaddvq_u64(vaddq_u64(
            vaddq_u64(acc[0], acc[1]),
            vaddq_u64(acc[2], acc[3]),
        ))
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn sum_words(lines: &[[u64; 8]]) -> u64 {
    lines.iter().flatten().fold(0u64, |s, &w| s.wrapping_add(w))
}

/// Reads thread `ith`'s share of `data` (of `nth` contiguous shares split at cache lines, the
/// last taking the rest) with [`sum_lines`]: the plain read the bandwidth is measured with.
pub(crate) fn read_share(data: &[u8], ith: usize, nth: usize) -> u64 {
    let bytes = data.len();
    let line = |t: usize| (bytes / 64) * t / nth * 64;
    let end = if ith + 1 == nth { bytes } else { line(ith + 1) };
    std::hint::black_box(sum_lines(std::hint::black_box(&data[line(ith)..end])))
}

/// Bytes of memory available to new allocations (`MemAvailable` of `/proc/meminfo`; `None`
/// where that is not readable).
fn available_memory() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The probe buffer's size when none is asked for: 1 GiB ([`DEFAULT_PROBE_BYTES`]: on the
/// machines measured, 32 times the last-level cache and more), or a quarter of the memory
/// available (`available`, bytes) where that is less, in whole MiB, at least 1 MiB.
pub fn default_probe_bytes(available: Option<usize>) -> usize {
    let quarter = available.map_or(usize::MAX, |a| (a / 4) & !((1 << 20) - 1));
    DEFAULT_PROBE_BYTES.min(quarter).max(1 << 20)
}

/// The largest probe buffer chosen by [`default_probe_bytes`].
pub const DEFAULT_PROBE_BYTES: usize = 1 << 30;

/// A probe of [`default_probe_bytes`] for this machine's available memory.
pub fn default_probe_bytes_here() -> usize {
    default_probe_bytes(available_memory())
}

/// A buffer for repeated measurements of the read bandwidth, allocated and written once: the
/// benchmark samples the bandwidth between decoded tokens with it.
pub struct ReadProbe {
    buf: Aligned,
    bytes: usize,
    threads: usize,
}

impl ReadProbe {
    /// `bytes` of memory (huge pages where the kernel grants them, as for the packed weights)
    /// to be read by `threads` threads, each its contiguous share. The buffer is written here
    /// so that every page is real memory, not the shared zero page.
    pub fn new(threads: usize, bytes: usize) -> anyhow::Result<ReadProbe> {
        let threads = threads.max(1);
        anyhow::ensure!(
            bytes >= 64 * threads,
            "a bandwidth measurement needs at least 64 bytes per thread, not {bytes} bytes for {threads} threads"
        );
        if let Some(avail) = available_memory() {
            anyhow::ensure!(
                bytes <= avail / 2,
                "a bandwidth measurement of {} MiB needs more than half of the {} MiB of memory available",
                bytes >> 20,
                avail >> 20
            );
        }
        let mut buf = Aligned::zeroed(bytes);
        // SAFETY: `bytes` bytes owned by `buf`, written once here and then only read.
        let data = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr(), bytes) };
        for (i, b) in data.iter_mut().enumerate().step_by(512) {
            *b = i as u8 | 1;
        }
        Ok(ReadProbe {
            buf,
            bytes,
            threads,
        })
    }

    /// Bytes read per pass.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Reads the buffer over and over for at least `min_time` (and 10 passes, after 3 to warm
    /// up): the median and best rate of one pass.
    pub fn measure(&self, min_time: Duration) -> ReadBandwidth {
        let (bytes, threads, data) = (self.bytes, self.threads, self.buf.bytes());
        let (median_us, best_us) = time_parallel(threads, min_time, |_, ith| {
            read_share(data, ith, threads);
        });
        let gbs = |us: f64| bytes as f64 / us / 1e3;
        ReadBandwidth {
            threads,
            bytes,
            median_gbs: gbs(median_us),
            best_gbs: gbs(best_us),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes of `words` (8-aligned, as they are u64s).
    fn as_bytes(words: &[u64]) -> &[u8] {
        // SAFETY: u64s are 8 plain bytes each.
        unsafe { words.align_to::<u8>().1 }
    }

    #[test]
    fn default_probe_is_a_gib_or_a_quarter_of_the_available_memory() {
        const MIB: usize = 1 << 20;
        assert_eq!(default_probe_bytes(None), 1024 * MIB);
        assert_eq!(default_probe_bytes(Some(16 * 1024 * MIB)), 1024 * MIB);
        assert_eq!(default_probe_bytes(Some(4 * 1024 * MIB)), 1024 * MIB);
        // Less than 4 GiB available: a quarter, rounded down to whole MiB.
        assert_eq!(default_probe_bytes(Some(3 * 1024 * MIB + 7)), 768 * MIB);
        assert_eq!(default_probe_bytes(Some(1000 * MIB + 3 * MIB)), 250 * MIB);
        // Never below 1 MiB (ReadProbe::new then says what is missing).
        assert_eq!(default_probe_bytes(Some(MIB)), MIB);
        assert_eq!(default_probe_bytes(Some(0)), MIB);
    }

    #[test]
    fn sum_lines_reads_every_word_and_the_ends() {
        let words: Vec<u64> = (0..8 * 24 + 2).map(|i| i * 0x0101_0001 + 7).collect();
        // Aligned, 24 whole lines: every word once.
        let lines = &words[..8 * 24];
        let expected = lines.iter().fold(0u64, |s, &w| s.wrapping_add(w));
        assert_eq!(sum_lines(as_bytes(lines)), expected);
        let mut changed = lines.to_vec();
        changed[8 * 2 + 5] ^= 1 << 17; // one bit in the middle of the third line
        assert_ne!(sum_lines(as_bytes(&changed)), expected);
        // Unaligned: the ends' bytes one by one, the aligned middle (24 whole lines) as words.
        let odd = &as_bytes(&words)[1..words.len() * 8 - 4];
        let middle: u64 = words[1..words.len() - 1]
            .iter()
            .fold(0u64, |s, &w| s.wrapping_add(w));
        let ends: u64 = as_bytes(&words)[1..8]
            .iter()
            .chain(&as_bytes(&words)[words.len() * 8 - 8..words.len() * 8 - 4])
            .map(|&b| u64::from(b))
            .sum();
        assert_eq!(sum_lines(odd), middle.wrapping_add(ends));
    }

    #[test]
    fn measures_a_positive_rate_with_one_and_two_threads() {
        for threads in [1, 2] {
            let bw = ReadProbe::new(threads, 8 << 20)
                .unwrap()
                .measure(Duration::from_millis(20));
            assert_eq!((bw.threads, bw.bytes), (threads, 8 << 20));
            assert!(bw.median_gbs.is_finite() && bw.median_gbs > 0.0, "{bw:?}");
            assert!(bw.best_gbs >= bw.median_gbs, "{bw:?}");
        }
    }

    #[test]
    fn rejects_a_buffer_larger_than_the_memory_can_hold() {
        assert!(
            available_memory().is_some_and(|b| b > 0),
            "Linux has MemAvailable"
        );
        let err = ReadProbe::new(1, 1 << 50).err().expect("a PiB buffer");
        assert!(err.to_string().contains("of memory available"), "{err}");
    }

    #[test]
    fn rejects_a_buffer_smaller_than_a_line_per_thread() {
        let err = ReadProbe::new(4, 100).err().expect("too small a buffer");
        assert!(err.to_string().contains("64 bytes per thread"), "{err}");
    }
}
