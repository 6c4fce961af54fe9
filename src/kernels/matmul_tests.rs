//! Tests of the quantized matrix-vector kernels ([`super::matmul`]).
//!
//! * GGUF blocks are dequantized by a reference written here from the block formats, and that
//!   reading is checked against ggml's own `to_float` (type traits) on the same blocks, so the
//!   formats are verified against ggml, not against our own understanding twice.
//! * The activation quantizer is checked against its specification (d = amax/127,
//!   q = round-half-even(x · 127/amax)), ties and tiny blocks included.
//! * Every available path (the AVX-VNNI code also through its EVEX twin on AVX-512 VNNI CPUs;
//!   both NEON variants under qemu) against two f64 references of the dequantized product:
//!   - with the activations as the kernel quantized them: the integer products are exact, so
//!     only f32 rounding remains: |y - ref_q| <= 1e-5 · mag, where mag = Σ_k |a_k| |x̂_k| and
//!     |a_k| bounds what the kernel adds per value (|w_k|; for Q4_K |d·sc·u| + |dmin·m|, as the
//!     kernel sums the two parts separately). With n_cols/32 block terms each rounded a few
//!     times the f32 error is below (n_cols/32 + 4) · 2^-24 · mag < 3e-6 · mag for the 768
//!     columns here (the 14336-column case, 452 · 6e-8 = 2.7e-5, gets that bound);
//!   - with the exact activations: the rounding of x to q moves each value by at most half a
//!     step, |x - x̂| <= d/2 = amax_b/254 (amax_b: largest |x| of its block of 32), so
//!     |y - ref| <= Σ_b amax_b/254 · Σ_{k in b} |w_k| + the f32 bound above. For random data
//!     that is ~0.4% of an output's natural size; the test checks the bound per output.
//! * Paths against the scalar path (same bound as against ref_q: only FMA and summation order
//!   differ), thread splits 1..=4 and their order (bit-identical: a tile's arithmetic does not
//!   depend on the split), activations quantized by the caller (bit-identical: every path's
//!   quantizer gives the same q), prefetch on and off (bit-identical), and validation.

use super::matmul::*;
use super::test_rng::Rng;
use super::KernelError;
use crate::ggml::gguf_writer::{dequantize, quantize};

fn f16_to_f64(h: u16) -> f64 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let e = ((h >> 10) & 0x1f) as i32;
    let m = (h & 0x3ff) as f64;
    match e {
        0 => sign * m * 2f64.powi(-24),
        0x1f if m == 0.0 => sign * f64::INFINITY,
        0x1f => f64::NAN,
        _ => sign * (1.0 + m / 1024.0) * 2f64.powi(e - 15),
    }
}

fn h(b: &[u8], at: usize) -> f64 {
    f16_to_f64(u16::from_le_bytes([b[at], b[at + 1]]))
}

/// One GGUF block dequantized from its format: (value, magnitude the kernel adds) per element.
fn dequant_block(ty: WeightType, b: &[u8]) -> Vec<(f64, f64)> {
    match ty {
        WeightType::Q4_0 => {
            let d = h(b, 0);
            let mut v = vec![(0.0, 0.0); 32];
            for j in 0..16 {
                let lo = d * ((b[2 + j] & 15) as f64 - 8.0);
                let hi = d * ((b[2 + j] >> 4) as f64 - 8.0);
                v[j] = (lo, lo.abs());
                v[16 + j] = (hi, hi.abs());
            }
            v
        }
        WeightType::Q8_0 => {
            let d = h(b, 0);
            (0..32)
                .map(|j| {
                    let w = d * b[2 + j] as i8 as f64;
                    (w, w.abs())
                })
                .collect()
        }
        WeightType::Q4K => {
            let (d, dmin) = (h(b, 0), h(b, 2));
            let s = &b[4..16];
            let qs = &b[16..144];
            let scale_min = |j: usize| -> (f64, f64) {
                if j < 4 {
                    ((s[j] & 63) as f64, (s[j + 4] & 63) as f64)
                } else {
                    (
                        ((s[j + 4] & 15) | ((s[j - 4] >> 6) << 4)) as f64,
                        ((s[j + 4] >> 4) | ((s[j] >> 6) << 4)) as f64,
                    )
                }
            };
            let mut v = Vec::with_capacity(256);
            for c in 0..4 {
                let q = &qs[32 * c..32 * c + 32];
                for half in 0..2 {
                    let (sc, m) = scale_min(2 * c + half);
                    for &byte in q {
                        let u = if half == 0 { byte & 15 } else { byte >> 4 } as f64;
                        let (a, bm) = (d * sc * u, dmin * m);
                        v.push((a - bm, a.abs() + bm.abs()));
                    }
                }
            }
            v
        }
        WeightType::Q6K => {
            let (ql, qh) = (&b[0..128], &b[128..192]);
            let sc = |i: usize| b[192 + i] as i8 as f64;
            let d = h(b, 208);
            let mut v = vec![(0.0, 0.0); 256];
            for n in 0..2 {
                let (l4, h2) = (&ql[64 * n..], &qh[32 * n..]);
                for l in 0..32 {
                    let vals = [
                        (l4[l] & 15) | ((h2[l] & 3) << 4),
                        (l4[l + 32] & 15) | (((h2[l] >> 2) & 3) << 4),
                        (l4[l] >> 4) | (((h2[l] >> 4) & 3) << 4),
                        (l4[l + 32] >> 4) | (((h2[l] >> 6) & 3) << 4),
                    ];
                    for (c, &u) in vals.iter().enumerate() {
                        let e = 128 * n + 32 * c + l;
                        let w = d * sc(e / 16) * (u as f64 - 32.0);
                        v[e] = (w, w.abs());
                    }
                }
            }
            v
        }
    }
}

/// Dequantizes a GGUF matrix with [`dequant_block`].
fn dequant_matrix(ty: WeightType, gguf: &[u8], n_rows: usize, n_cols: usize) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(n_rows * n_cols);
    for blk in gguf.chunks(ty.block_bytes()) {
        out.extend(dequant_block(ty, blk));
    }
    assert_eq!(out.len(), n_rows * n_cols);
    out
}

/// A random positive or negative f16 scale between 2^-10 and 2^-4 (or 0 rarely).
fn rand_scale(rng: &mut Rng) -> [u8; 2] {
    let r = rng.next_u64();
    if r.is_multiple_of(97) {
        return [0, 0];
    }
    let e = 5 + (r >> 8) % 6;
    let bits = ((e << 10) | ((r >> 16) & 1023) | if r & 1 == 1 { 0x8000 } else { 0 }) as u16;
    bits.to_le_bytes()
}

/// GGUF test matrix: rows alternate between ggml-quantized random values (realistic blocks,
/// row magnitudes varying over 4 orders) and random bit patterns with sane scales (every
/// nibble, 6-bit scale, high-bit and sign pattern).
fn make_weights(ty: WeightType, n_rows: usize, n_cols: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let row_bytes = n_cols / ty.block_values() * ty.block_bytes();
    let mut out = Vec::with_capacity(n_rows * row_bytes);
    for r in 0..n_rows {
        if r % 2 == 0 {
            let mag = [1.0f32, 0.01, 30.0, 0.3][r / 2 % 4];
            let vals: Vec<f32> = (0..n_cols).map(|_| rng.f32() * mag).collect();
            out.extend(quantize(ty.ggml(), &vals, n_cols).expect("ggml quantize"));
        } else {
            for _ in 0..n_cols / ty.block_values() {
                let mut b: Vec<u8> = (0..ty.block_bytes())
                    .map(|_| rng.next_u64() as u8)
                    .collect();
                match ty {
                    WeightType::Q4_0 | WeightType::Q8_0 => {
                        b[0..2].copy_from_slice(&rand_scale(&mut rng))
                    }
                    WeightType::Q4K => {
                        b[0..2].copy_from_slice(&rand_scale(&mut rng));
                        b[2..4].copy_from_slice(&rand_scale(&mut rng));
                    }
                    WeightType::Q6K => b[208..210].copy_from_slice(&rand_scale(&mut rng)),
                }
                out.extend(b);
            }
        }
    }
    out
}

/// Activation rows: uniform values at magnitudes from 1e-3 to 100 per row, one all-zero block
/// and an outlier.
fn make_acts(rows: usize, n_cols: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed ^ 0x5555);
    let mut x = Vec::with_capacity(rows * n_cols);
    for r in 0..rows {
        let mag = [1.0f32, 100.0, 0.001, 3.0][r % 4];
        for k in 0..n_cols {
            let v = if r == 1 && k < 32 {
                0.0
            } else if k == 37 {
                rng.f32() * mag * 40.0
            } else {
                rng.f32() * mag
            };
            x.push(v);
        }
    }
    x
}

/// Matmul implementations under test, with names.
fn matmuls() -> Vec<(String, Matmul)> {
    let mut v: Vec<(String, Matmul)> = available_matmul_paths()
        .into_iter()
        .map(|p| (p.name().to_string(), Matmul::for_path(p).unwrap()))
        .collect();
    if let Some(twin) = Matmul::avxvnni_evex_twin() {
        v.push(("avxvnni (evex twin)".to_string(), twin));
    }
    v
}

struct Case {
    ty: WeightType,
    n_rows: usize,
    n_cols: usize,
    gguf: Vec<u8>,
    w: Vec<(f64, f64)>,
    packed: PackedMatrix,
}

impl Case {
    fn new(ty: WeightType, n_rows: usize, n_cols: usize, seed: u64) -> Case {
        let gguf = make_weights(ty, n_rows, n_cols, seed);
        let w = dequant_matrix(ty, &gguf, n_rows, n_cols);
        let packed = PackedMatrix::pack(ty, n_rows, n_cols, &gguf).unwrap();
        Case {
            ty,
            n_rows,
            n_cols,
            gguf,
            w,
            packed,
        }
    }
}

/// Per output (row r, n): (ref with quantized x, mag, ref with exact x, activation bound).
fn references(c: &Case, x: &[f32], rows: usize) -> Vec<[f64; 4]> {
    let k = c.n_cols;
    let mut out = Vec::with_capacity(rows * c.n_rows);
    for r in 0..rows {
        let xr = &x[r * k..(r + 1) * k];
        let q = QuantizedActs::quantize(xr, 1, k).unwrap();
        let xq: Vec<f64> = q.dequantized(0).iter().map(|&v| v as f64).collect();
        let amax: Vec<f64> = xr
            .chunks(32)
            .map(|b| b.iter().fold(0f64, |a, &v| a.max((v as f64).abs())))
            .collect();
        for n in 0..c.n_rows {
            let w = &c.w[n * k..(n + 1) * k];
            let (mut rq, mut mag, mut re, mut bound) = (0.0, 0.0, 0.0, 0.0);
            for i in 0..k {
                rq += w[i].0 * xq[i];
                mag += w[i].1 * xq[i].abs();
                re += w[i].0 * xr[i] as f64;
                bound += w[i].0.abs() * amax[i / 32] / 254.0;
            }
            out.push([rq, mag, re, bound]);
        }
    }
    out
}

/// Checks `y` against the references; returns the largest error relative to mag (quantized
/// reference) and the largest observed share of the activation bound used.
fn check(name: &str, c: &Case, rows: usize, y: &[f32], refs: &[[f64; 4]], tol: f64) -> (f64, f64) {
    let (mut worst_q, mut worst_share) = (0f64, 0f64);
    for r in 0..rows {
        for n in 0..c.n_rows {
            let [rq, mag, re, bound] = refs[r * c.n_rows + n];
            let got = y[r * c.n_rows + n] as f64;
            let eq = (got - rq).abs();
            assert!(
                got.is_finite() && eq <= tol * mag + 1e-30,
                "{name} {} {}x{} rows {rows}: y[{r}][{n}] = {got}, quantized-x reference {rq} (err {eq:e} > {tol:e} x mag {mag:e})",
                c.ty, c.n_rows, c.n_cols
            );
            let ee = (got - re).abs();
            let allowed = bound + tol * mag + 1e-30;
            assert!(
                ee <= allowed,
                "{name} {} {}x{} rows {rows}: y[{r}][{n}] = {got}, exact reference {re}: error {ee:e} above the activation-quantization bound {allowed:e}",
                c.ty, c.n_rows, c.n_cols
            );
            worst_q = worst_q.max(eq / mag.max(1e-30));
            worst_share = worst_share.max(ee / allowed);
        }
    }
    (worst_q, worst_share)
}

#[test]
fn dequantization_matches_ggml_type_traits() {
    for ty in WeightType::ALL {
        let (n_rows, n_cols) = (6, 512);
        let gguf = make_weights(ty, n_rows, n_cols, 7);
        let ours = dequant_matrix(ty, &gguf, n_rows, n_cols);
        let ggml = dequantize(ty.ggml(), &gguf, n_rows * n_cols).unwrap();
        for (i, (&(v, mag), &g)) in ours.iter().zip(&ggml).enumerate() {
            // ggml computes in f32 (Q4_K: d*sc*u - dmin*m, possibly fused): a few roundings.
            assert!(
                (v - g as f64).abs() <= 4.0 * f32::EPSILON as f64 * mag,
                "{ty} element {i}: our reading {v}, ggml's to_float {g}"
            );
        }
    }
}

#[test]
fn activation_quantizer_follows_its_specification() {
    let mut rng = Rng::new(3);
    let k = 128;
    let mut x: Vec<f32> = (0..k).map(|_| rng.f32() * 5.0).collect();
    // block 1: amax 127 -> id 1: ties at .5 round to even.
    for (i, v) in x[32..64].iter_mut().enumerate() {
        *v = [2.5f32, -2.5, 3.5, 0.5, -0.5, 1.5, 126.5, 127.0][i % 8];
    }
    // block 2: zeros; block 3: tiny values (below the 1e-30 floor) -> zeros too.
    x[64..96].iter_mut().for_each(|v| *v = 0.0);
    x[96..128].iter_mut().for_each(|v| *v = 1e-35);
    let q = QuantizedActs::quantize(&x, 1, k).unwrap();
    for (b, blk) in x.chunks(32).enumerate() {
        let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
        let (d, id) = if amax >= 1e-30 {
            (amax / 127.0, 127.0 / amax)
        } else {
            (0.0, 0.0)
        };
        assert_eq!(q.d(0)[b].to_bits(), d.to_bits(), "block {b} scale");
        for (i, &v) in blk.iter().enumerate() {
            let want = (v * id).round_ties_even() as i8;
            assert_eq!(q.q(0)[32 * b + i], want, "block {b} value {i} ({v})");
        }
    }
    assert_eq!(&q.q(0)[32..40], &[2, -2, 4, 0, 0, 2, 126, 127]);
}

#[test]
fn every_path_against_f64_references() {
    let shapes: &[(usize, usize)] = &[(1, 256), (7, 512), (17, 256), (33, 768), (50, 512)];
    let extra_32: &[(usize, usize)] = &[(3, 32), (19, 96), (16, 160)];
    let paths = matmuls();
    let mut report = Vec::new();
    for ty in WeightType::ALL {
        let mut list = shapes.to_vec();
        if ty.block_values() == 32 {
            list.extend_from_slice(extra_32);
        }
        for (si, &(n_rows, n_cols)) in list.iter().enumerate() {
            let c = Case::new(ty, n_rows, n_cols, 100 + si as u64);
            let x = make_acts(8, n_cols, si as u64);
            for rows in 1..=8 {
                let xs = &x[..rows * n_cols];
                let refs = references(&c, xs, rows);
                let scalar = {
                    let mut y = vec![f32::NAN; rows * n_rows];
                    Matmul::for_path(MatmulPath::Scalar)
                        .unwrap()
                        .run(&c.packed, xs, &mut y, 1)
                        .unwrap();
                    y
                };
                for (name, m) in &paths {
                    let mut y = vec![f32::NAN; rows * n_rows];
                    m.run(&c.packed, xs, &mut y, 1).unwrap();
                    let (eq, share) = check(name, &c, rows, &y, &refs, 1e-5);
                    for (i, (a, b)) in y.iter().zip(&scalar).enumerate() {
                        let mag = refs[i][1];
                        assert!(
                            ((a - b) as f64).abs() <= 1e-5 * mag + 1e-30,
                            "{name} vs scalar, {ty} {n_rows}x{n_cols} rows {rows}, output {i}: {a} vs {b}"
                        );
                    }
                    report.push((name.clone(), ty, eq, share));
                }
            }
        }
    }
    for (name, _) in &paths {
        for ty in WeightType::ALL {
            let mine = report.iter().filter(|r| &r.0 == name && r.1 == ty);
            let (eq, share) = mine.fold((0f64, 0f64), |a, r| (a.0.max(r.2), a.1.max(r.3)));
            eprintln!("{name:>20} {ty}: worst error / mag vs quantized-x reference {eq:.2e}; worst share of the activation bound {share:.3}");
        }
    }
}

#[test]
fn long_rows_cross_tiles_with_prefetch() {
    // 14336 columns (Mistral 7B's FFN width) and three tiles: the prefetch address runs past
    // each tile's sections into the next tile. Prefetching never changes a result.
    for ty in [WeightType::Q4_0, WeightType::Q6K] {
        let c = Case::new(ty, 40, 14336, 9);
        let x = make_acts(8, 14336, 4);
        let rows = 3;
        let refs = references(&c, &x[..rows * 14336], rows);
        for (name, m) in matmuls() {
            let mut y = vec![0f32; rows * 40];
            m.run(&c.packed, &x[..rows * 14336], &mut y, 2).unwrap();
            check(&name, &c, rows, &y, &refs, 3e-5);
            let before = prefetch_distance();
            set_prefetch_distance(0);
            let mut y0 = vec![0f32; rows * 40];
            m.run(&c.packed, &x[..rows * 14336], &mut y0, 2).unwrap();
            set_prefetch_distance(before);
            assert_eq!(y, y0, "{name}: prefetching changed the result");
        }
    }
}

#[test]
fn thread_splits_orders_and_prequantized_acts_are_bit_identical() {
    for ty in WeightType::ALL {
        let n_cols = 256;
        for n_rows in [1, 17, 33, 50] {
            let c = Case::new(ty, n_rows, n_cols, n_rows as u64);
            let x = make_acts(8, n_cols, 11);
            for rows in [1, 3, 8] {
                let xs = &x[..rows * n_cols];
                let xq = QuantizedActs::quantize(xs, rows, n_cols).unwrap();
                for (name, m) in matmuls() {
                    let mut base = vec![f32::NAN; rows * n_rows];
                    m.run(&c.packed, xs, &mut base, 1).unwrap();
                    for nth in 1..=4 {
                        for rev in [false, true] {
                            let mut order: Vec<usize> = (0..nth).collect();
                            if rev {
                                order.reverse();
                            }
                            for pre in [false, true] {
                                let mut y = vec![f32::NAN; rows * n_rows];
                                m.run_sequential(
                                    &c.packed,
                                    xs,
                                    pre.then_some(&xq),
                                    &mut y,
                                    nth,
                                    &order,
                                )
                                .unwrap();
                                assert!(
                                    y.iter().zip(&base).all(|(a, b)| a.to_bits() == b.to_bits()),
                                    "{name} {ty} {n_rows}x{n_cols} rows {rows}: {nth} threads (reversed {rev}, pre-quantized {pre}) differ from 1"
                                );
                            }
                        }
                    }
                    let mut y = vec![f32::NAN; rows * n_rows];
                    m.run(&c.packed, xs, &mut y, 3).unwrap();
                    assert!(y.iter().zip(&base).all(|(a, b)| a.to_bits() == b.to_bits()));
                    m.run_quantized(&c.packed, &xq, &mut y, 2).unwrap();
                    assert!(y.iter().zip(&base).all(|(a, b)| a.to_bits() == b.to_bits()));
                }
            }
        }
    }
}

#[test]
fn batches_are_computed_in_chunks_of_eight_rows() {
    // A batch of 21 rows in one call: each chunk of 8 rows (and the last of 5) gives exactly
    // what a call with those rows alone gives; quantizing in parts from several threads gives
    // the same bytes as quantizing at once.
    for ty in WeightType::ALL {
        let c = Case::new(ty, 20, 512, 5);
        let x: Vec<f32> = (0..3)
            .flat_map(|i| make_acts(8, 512, i))
            .take(21 * 512)
            .collect();
        let xq = QuantizedActs::quantize(&x, 21, 512).unwrap();
        for r in 0..21 {
            let one = QuantizedActs::quantize(&x[r * 512..(r + 1) * 512], 1, 512).unwrap();
            assert_eq!(xq.q(r), one.q(0), "row {r} values");
            assert_eq!(xq.d(r), one.d(0), "row {r} scales");
        }
        let bytes = quantized_acts_bytes(21, 512).unwrap();
        let mut parts = vec![0u8; bytes];
        let mut whole = vec![0u8; bytes];
        // SAFETY: both buffers hold the batch's bytes; x holds 21 rows of 512.
        unsafe {
            for ith in [2, 0, 1] {
                assert_eq!(
                    quantize_part_raw(x.as_ptr(), 512, 21, 512, parts.as_mut_ptr(), ith, 3),
                    0
                );
            }
            assert_eq!(
                quantize_part_raw(x.as_ptr(), 512, 21, 512, whole.as_mut_ptr(), 0, 1),
                0
            );
        }
        assert!(parts == whole, "{ty}: quantize_part in 3 parts differs");
        for (name, m) in matmuls() {
            let mut y = vec![f32::NAN; 21 * 20];
            m.run(&c.packed, &x, &mut y, 2).unwrap();
            let refs = references(&c, &x, 21);
            check(&name, &c, 21, &y, &refs, 1e-5);
            for (c0, rows) in [(0, 8), (8, 8), (16, 5)] {
                let mut part = vec![f32::NAN; rows * 20];
                m.run(&c.packed, &x[c0 * 512..(c0 + rows) * 512], &mut part, 1)
                    .unwrap();
                assert!(
                    part.iter()
                        .zip(&y[c0 * 20..])
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{name} {ty}: rows {c0}.. of the batch differ from a call with them alone"
                );
            }
            m.run_quantized(&c.packed, &xq, &mut y, 3).unwrap();
            check(&name, &c, 21, &y, &refs, 1e-5);
        }
    }
}

#[test]
fn packing_and_sizes() {
    // Packed sizes: per row as GGUF's plus the last tile's zero rows (Q4_K/Q6_K: +4/+2 bytes
    // per 256 values).
    let per_row = |ty: WeightType, k: usize| PackedMatrix::packed_size(ty, 16, k).unwrap() / 16;
    assert_eq!(per_row(WeightType::Q4_0, 4096), 4096 / 32 * 18);
    assert_eq!(per_row(WeightType::Q8_0, 4096), 4096 / 32 * 34);
    assert_eq!(per_row(WeightType::Q4K, 4096), 4096 / 256 * 148);
    assert_eq!(per_row(WeightType::Q6K, 4096), 4096 / 256 * 212);
    assert_eq!(
        PackedMatrix::packed_size(WeightType::Q4_0, 17, 4096).unwrap(),
        2 * PackedMatrix::packed_size(WeightType::Q4_0, 16, 4096).unwrap()
    );
    let c = Case::new(WeightType::Q4K, 5, 256, 1);
    assert_eq!(
        c.packed.bytes().len(),
        PackedMatrix::packed_size(WeightType::Q4K, 5, 256).unwrap()
    );
    assert_eq!(c.packed.as_ptr() as usize % 64, 0);
    assert_eq!(c.gguf.len(), WeightType::Q4K.gguf_bytes(5, 256).unwrap());
}

#[test]
fn validation_errors() {
    let bad = |r: Result<PackedMatrix, KernelError>| match r {
        Err(KernelError::InvalidMatmul(_)) => {}
        other => panic!("expected InvalidMatmul, got {other:?}"),
    };
    bad(PackedMatrix::pack(WeightType::Q4_0, 0, 32, &[]));
    bad(PackedMatrix::pack(WeightType::Q4_0, 1, 48, &[0; 27]));
    bad(PackedMatrix::pack(WeightType::Q4K, 1, 128, &[0; 72]));
    bad(PackedMatrix::pack(WeightType::Q4_0, 1, 32, &[0; 17]));
    bad(PackedMatrix::pack(WeightType::Q4_0, usize::MAX, 32, &[]));
    let c = Case::new(WeightType::Q4_0, 3, 64, 2);
    let m = Matmul::for_path(MatmulPath::Scalar).unwrap();
    let x = vec![0.5f32; 64];
    let mut y = vec![0f32; 3];
    assert!(m.run(&c.packed, &x[..63], &mut y, 1).is_err());
    assert!(m.run(&c.packed, &[], &mut y, 1).is_err());
    assert!(m.run(&c.packed, &x, &mut y[..2], 1).is_err());
    assert!(m.run(&c.packed, &x, &mut y, 0).is_err());
    assert!(m
        .run_sequential(&c.packed, &x, None, &mut y, 2, &[0, 0])
        .is_err());
    assert!(QuantizedActs::quantize(&x, 1, 48).is_err());
    assert!(QuantizedActs::quantize(&[], 0, 32).is_err());
    assert!(quantized_acts_bytes(MAX_BATCH + 1, 32).is_err());
    let q96 = QuantizedActs::quantize(&[0.0; 96], 1, 96).unwrap();
    assert!(m.run_quantized(&c.packed, &q96, &mut y, 1).is_err());
    m.run(&c.packed, &x, &mut y, 1).unwrap();

    // The C side rejects what it cannot compute and writes nothing.
    let mut y = vec![7f32; 3];
    let mut raw = RawMatmulParams {
        wtype: 2,
        nr: 1,
        n_rows: 3,
        n_cols: 64,
        w: c.packed.as_ptr().cast(),
        x: x.as_ptr(),
        x_stride: 64,
        xq: std::ptr::null(),
        y: y.as_mut_ptr(),
        y_stride: 3,
        scratch: std::ptr::null_mut(),
        scratch_bytes: 0,
    };
    // SAFETY: every call below is invalid in a way the C side checks before reading anything.
    unsafe {
        assert_eq!(m.run_raw(&raw, 0, 1), -1, "no scratch");
        raw.nr = 0;
        assert_eq!(m.run_raw(&raw, 0, 1), -1, "nr 0");
        raw.nr = MAX_BATCH as i32 + 1;
        assert_eq!(m.run_raw(&raw, 0, 1), -1, "nr above the batch limit");
        raw.nr = 1;
        raw.n_cols = 48;
        assert_eq!(m.run_raw(&raw, 0, 1), -1, "48 columns");
        raw.n_cols = 64;
        raw.wtype = 3;
        assert_eq!(m.run_raw(&raw, 0, 1), -1, "type Q4_1");
        raw.wtype = 2;
        raw.y_stride = 2;
        assert_eq!(m.run_raw(&raw, 0, 1), -1, "y stride");
        raw.y_stride = 3;
        assert_eq!(m.run_raw(&raw, 1, 1), -1, "ith >= nth");
    }
    assert_eq!(y, vec![7f32; 3]);
}

#[test]
fn path_selection() {
    let best = matmul_path_for_env(None, None).unwrap();
    assert!(best.is_available());
    assert_eq!(matmul_path_for_env(Some(" "), Some("")).unwrap(), best);
    assert_eq!(
        matmul_path_for_env(Some("SCALAR"), Some("avx512")).unwrap_or(MatmulPath::Scalar),
        MatmulPath::Scalar
    );
    assert_eq!(
        matmul_path_for_env(None, Some("scalar")).unwrap(),
        MatmulPath::Scalar
    );
    assert!(matches!(
        matmul_path_for_env(Some("bogus"), None),
        Err(KernelError::UnknownMatmulPath(_))
    ));
    assert!(matches!(
        matmul_path_for_env(None, Some("avxvnni")),
        Err(KernelError::UnknownPath(_))
    ));
    for p in MatmulPath::ALL {
        assert_eq!(MatmulPath::from_name(p.name()).unwrap(), p);
        match matmul_path_for_env(Some(p.name()), None) {
            Ok(got) => {
                assert_eq!(got, p);
                assert!(p.is_available());
            }
            Err(KernelError::MatmulUnavailable { path, .. }) => {
                assert_eq!(path, p);
                assert!(!p.is_available());
            }
            Err(e) => panic!("{p}: {e}"),
        }
        // A family picks its best available variant.
        if p.is_available() {
            let fam = matmul_path_for_env(None, Some(p.family().name())).unwrap();
            assert_eq!(fam.family(), p.family());
            assert!(fam.is_available());
            if p != MatmulPath::Scalar {
                let vnni_rank = |q: MatmulPath| {
                    matches!(
                        q,
                        MatmulPath::AvxVnni | MatmulPath::Avx512Vnni | MatmulPath::NeonDotprod
                    ) as u8
                };
                assert!(vnni_rank(fam) >= vnni_rank(p));
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        assert!(!MatmulPath::Neon.is_available());
        assert_eq!(
            MatmulPath::Avx512Vnni.is_available(),
            std::arch::is_x86_feature_detected!("avx512vnni")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
        );
        assert_eq!(
            MatmulPath::Avx2.is_available(),
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
        );
    }
    #[cfg(target_arch = "aarch64")]
    {
        assert!(MatmulPath::Neon.is_available());
        if let Ok(v) = std::env::var("MISTRALD_TEST_EXPECT_DOTPROD") {
            assert_eq!(
                MatmulPath::NeonDotprod.is_available(),
                v == "1",
                "MISTRALD_TEST_EXPECT_DOTPROD={v}"
            );
        }
    }
    // The C dispatcher follows the selection.
    let sel = Matmul::selected().unwrap();
    // SAFETY: pure query.
    let cur = unsafe { super::ffi::mk_mm_current_path() };
    assert_eq!(cur as u32, sel.path() as u32);
}

#[test]
fn large_matrices_live_in_huge_page_mappings_with_the_same_results() {
    // 1024 x 4096 Q8_0 (4.5 MB) is packed into a 2 MiB-aligned anonymous mapping; its first
    // 16 rows must give exactly what a small (heap) matrix of those rows gives.
    let (n, k, ty) = (1024, 4096, WeightType::Q8_0);
    let gguf = make_weights(ty, n, k, 21);
    let big = PackedMatrix::pack(ty, n, k, &gguf).unwrap();
    assert_eq!(
        big.as_ptr() as usize % (2 << 20),
        0,
        "not in a huge-page mapping"
    );
    let row_bytes = ty.gguf_bytes(1, k).unwrap();
    let small = PackedMatrix::pack(ty, 16, k, &gguf[..16 * row_bytes]).unwrap();
    let x = make_acts(3, k, 2);
    let m = Matmul::selected().unwrap();
    let mut yb = vec![0f32; 3 * n];
    let mut ys = vec![0f32; 3 * 16];
    m.run(&big, &x, &mut yb, 2).unwrap();
    m.run(&small, &x, &mut ys, 1).unwrap();
    for r in 0..3 {
        assert_eq!(&yb[r * n..r * n + 16], &ys[r * 16..r * 16 + 16], "row {r}");
    }
}

#[test]
fn one_row_width_setting_parses_and_rejects_bad_values() {
    assert_eq!(one_row_width_for_env(None).unwrap(), None);
    assert_eq!(one_row_width_for_env(Some(" ")).unwrap(), None);
    assert_eq!(one_row_width_for_env(Some("256")).unwrap(), Some(true));
    assert_eq!(one_row_width_for_env(Some(" 512 ")).unwrap(), Some(false));
    for bad in ["128", "wide", "256bit"] {
        let err = one_row_width_for_env(Some(bad)).unwrap_err();
        assert!(matches!(err, KernelError::BadOneRowWidth(_)), "{bad}");
        assert!(err.to_string().contains(bad), "{err}");
    }
}

/// AMD Zen 4 as CPUID states it (vendor, family 19h) with AVX-512 VNNI: where the AVX-512 VNNI
/// path's one-row products default to its 256-bit tiles.
#[cfg(target_arch = "x86_64")]
fn is_zen4() -> bool {
    // CPUID leaves 0 and 1 exist on every x86-64 CPU.
    let (l0, l1) = (std::arch::x86_64::__cpuid(0), std::arch::x86_64::__cpuid(1));
    let amd = [l0.ebx, l0.edx, l0.ecx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .eq(*b"AuthenticAMD");
    let base = (l1.eax >> 8) & 0xf;
    let family = if base == 0xf {
        base + ((l1.eax >> 20) & 0xff)
    } else {
        base
    };
    amd && family == 0x19 && MatmulPath::Avx512Vnni.is_available()
}

#[test]
fn the_avx512_vnni_paths_one_row_tiles_of_either_width_give_the_same_results() {
    // The default (read before anything below changes it) follows the CPU.
    let default = narrow_one_row();
    #[cfg(target_arch = "x86_64")]
    assert_eq!(default, is_zen4(), "default one-row width");
    #[cfg(not(target_arch = "x86_64"))]
    assert!(!default);
    let Ok(m) = Matmul::for_path(MatmulPath::Avx512Vnni) else {
        return; // no AVX-512 VNNI here: the setting has no effect
    };
    // Q8_0 keeps its 512-bit tile either way; the others switch. Both widths must agree to the
    // bit (the same arithmetic per output row), on odd shapes and every thread split, and
    // products of 2 rows are not affected.
    for (i, ty) in WeightType::ALL.into_iter().enumerate() {
        let n_cols = if ty.block_values() == 32 { 800 } else { 768 };
        let c = Case::new(ty, 37, n_cols, 900 + i as u64);
        for rows in [1, 2] {
            let x = make_acts(rows, n_cols, 31 + i as u64);
            let mut got = Vec::new();
            for narrow in [false, true] {
                set_narrow_one_row(narrow);
                for nth in [1, 3] {
                    let mut y = vec![f32::NAN; rows * c.n_rows];
                    m.run(&c.packed, &x, &mut y, nth).unwrap();
                    got.push(y);
                }
            }
            set_narrow_one_row(default);
            for y in &got[1..] {
                assert_eq!(
                    y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    got[0].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{ty:?}, {rows} rows"
                );
            }
            assert!(got[0].iter().all(|v| v.is_finite()));
        }
    }
}

#[test]
fn one_row_width_follows_the_variable_then_the_cpu_then_where_the_weights_live() {
    let llc = 32 << 20;
    // The variable wins over everything.
    assert!(one_row_narrow(Some("256"), false, Some(1), llc).unwrap());
    assert!(!one_row_narrow(Some("512"), true, Some(1 << 40), llc).unwrap());
    assert!(one_row_narrow(Some("x"), true, None, llc).is_err());
    // A CPU without the preference never narrows.
    assert!(!one_row_narrow(None, false, Some(1 << 40), llc).unwrap());
    assert!(!one_row_narrow(None, false, None, llc).unwrap());
    // With it: matrices beyond the cache (from memory) narrow, those that fit do not.
    assert!(one_row_narrow(None, true, Some(4 << 30), llc).unwrap());
    assert!(one_row_narrow(Some(""), true, Some(llc + 1), llc).unwrap());
    assert!(!one_row_narrow(None, true, Some(llc), llc).unwrap());
    assert!(!one_row_narrow(None, true, Some(20 << 20), llc).unwrap());
    assert!(one_row_narrow(None, true, None, llc).unwrap());
}

#[test]
fn cache_sizes_parse_as_sysfs_writes_them() {
    assert_eq!(parse_cache_size("32768K\n"), Some(32 << 20));
    assert_eq!(parse_cache_size("2M"), Some(2 << 20));
    assert_eq!(parse_cache_size("1G"), Some(1 << 30));
    assert_eq!(parse_cache_size("512"), Some(512));
    assert_eq!(parse_cache_size(""), None);
    assert_eq!(parse_cache_size("12Q"), None);
    assert_eq!(parse_cache_size("K"), None);
    assert_eq!(parse_cache_size("99999999999999999999K"), None);
    // This machine's: a plausible size (a CPU without sysfs cache entries gets 32 MiB).
    let llc = last_level_cache_bytes();
    assert!((256 << 10..=4u64 << 30).contains(&llc), "{llc}");
}
