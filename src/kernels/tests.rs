//! Tests of the attention kernels.
//!
//! * The scalar C kernel against a plain f64 reference written here (same
//!   dequantized cache values): normwise relative error per output row
//!   (max |out - ref| / max |ref| over one head's head_dim values)
//!   < [`TOL_REF`]. f32 accumulation over <= 256 products and a few hundred
//!   softmax terms gives errors of a few 1e-7 relative; 1e-5 leaves margin while
//!   catching any real mistake (a missed or extra key, a wrong slot, scale or
//!   head changes results by > 1e-2).
//! * Every other available path (and on aarch64 both NEON variants) against
//!   the same reference with the same bound, and against the scalar kernel
//!   (< [`TOL_PATH`]): paths differ only in f32 summation order.
//! * NEON dotprod on a Q8_0 cache scores keys with the query quantized to
//!   Q8_0 (like ggml); it is checked against the f64 reference computed with
//!   that same quantized query (same bound), which pins the integer dot product
//!   exactly; against the f32-query scalar kernel the quantization error of
//!   the query (~0.4% per element) makes the outputs differ by ~1e-3, which is
//!   not a kernel error.
//!
//! Cache slots that do not hold history (and padding between heads/slots)
//! are filled with NaN, so reading any wrong slot poisons the output.

use super::test_rng::Rng;
use super::*;

const TOL_REF: f64 = 1e-5;
const TOL_PATH: f64 = 1e-5;

/// f32 -> IEEE half bits, round to nearest even (test data only).
fn f32_to_f16(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if man != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        let m = man | 0x80_0000;
        let shift = (14 - e) as u32;
        let half = 1u32 << (shift - 1);
        let mut r = m >> shift;
        let rem = m & ((1 << shift) - 1);
        if rem > half || (rem == half && r & 1 == 1) {
            r += 1;
        }
        return sign | r as u16;
    }
    let mut r = ((e as u32) << 10) | (man >> 13);
    let rem = man & 0x1fff;
    if rem > 0x1000 || (rem == 0x1000 && r & 1 == 1) {
        r += 1; // may carry into the exponent: still correct
    }
    sign | r as u16
}

/// IEEE half bits -> f64, written independently of the C converter.
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

/// Encodes a row as `ty`, returns its bytes and the values the kernel will see.
fn encode_row(ty: KvType, x: &[f32]) -> (Vec<u8>, Vec<f64>) {
    match ty {
        KvType::F32 => (
            x.iter().flat_map(|v| v.to_le_bytes()).collect(),
            x.iter().map(|&v| v as f64).collect(),
        ),
        KvType::F16 => {
            let h: Vec<u16> = x.iter().map(|&v| f32_to_f16(v)).collect();
            (
                h.iter().flat_map(|v| v.to_le_bytes()).collect(),
                h.iter().map(|&v| f16_to_f64(v)).collect(),
            )
        }
        KvType::Q8_0 => {
            let mut bytes = Vec::new();
            let mut vals = Vec::new();
            for blk in x.chunks(32) {
                let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = f32_to_f16(amax / 127.0);
                let df = f16_to_f64(d);
                bytes.extend_from_slice(&d.to_le_bytes());
                for &v in blk {
                    let q = if df == 0.0 {
                        0
                    } else {
                        (v as f64 / df).round().clamp(-127.0, 127.0) as i8
                    };
                    bytes.push(q as u8);
                    vals.push(df * q as f64);
                }
            }
            (bytes, vals)
        }
    }
}

/// The query as the dotprod path sees it for Q8_0 keys: quantized per block
/// of 32 with d = amax/127 (f32) and q = round(x * (1/d)), as in mk_quantize_q8.
fn quantize_query(x: &[f32]) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.len());
    for blk in x.chunks(32) {
        let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        for &v in blk {
            out.push(d as f64 * (v * id).round() as f64);
        }
    }
    out
}

#[derive(Debug, Clone)]
struct Case {
    p: AttnParams,
    /// Multiplies the queries: large values make large scores, which would
    /// overflow a softmax without the running max.
    q_mag: f32,
    seed: u64,
}

/// Test data: the ring as the kernel reads it, plus the logical values.
struct Data {
    q: Vec<f32>,
    k_new: Vec<f32>,
    v_new: Vec<f32>,
    k_cache: Vec<u64>,
    v_cache: Vec<u64>,
    /// keys[(j - (pos0 - n_hist)) * n_head_kv + h]: dequantized history rows
    k_hist: Vec<Vec<f64>>,
    v_hist: Vec<Vec<f64>>,
}

fn as_bytes(v: &[u64], len: usize) -> &[u8] {
    // SAFETY: u64 has no padding; the view covers exactly the vector's bytes.
    let all = unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), v.len() * 8) };
    &all[..len]
}

fn make_data(c: &Case) -> Data {
    let p = &c.p;
    let mut rng = Rng::new(c.seed);
    let d = p.head_dim;
    let bytes = p.cache_bytes();
    // 0xff everywhere: NaN as f32, f16 and as a Q8_0 scale.
    let mut kc = vec![u64::MAX; bytes.div_ceil(8)];
    let mut vc = vec![u64::MAX; bytes.div_ceil(8)];
    let mut k_hist = Vec::new();
    let mut v_hist = Vec::new();
    let start = p.pos0 - p.n_hist as u64;
    for j in start..p.pos0 {
        let slot = (j % p.n_slots as u64) as usize;
        for h in 0..p.n_head_kv {
            let off = slot * p.slot_bytes + h * p.head_bytes;
            for (cache, hist) in [(&mut kc, &mut k_hist), (&mut vc, &mut v_hist)] {
                let x: Vec<f32> = (0..d).map(|_| rng.f32()).collect();
                let (b, vals) = encode_row(p.kv_type, &x);
                // SAFETY: writes within the cache buffer (off + row <= bytes).
                let buf = unsafe {
                    std::slice::from_raw_parts_mut(cache.as_mut_ptr().cast::<u8>(), bytes)
                };
                buf[off..off + b.len()].copy_from_slice(&b);
                hist.push(vals);
            }
        }
    }
    let gen = |n: usize, mag: f32, rng: &mut Rng| -> Vec<f32> {
        (0..n).map(|_| rng.f32() * mag).collect()
    };
    let q = gen(p.n_q * p.n_head * d, c.q_mag, &mut rng);
    let k_new = gen(p.n_q * p.n_head_kv * d, 1.0, &mut rng);
    let v_new = gen(p.n_q * p.n_head_kv * d, 1.0, &mut rng);
    Data {
        q,
        k_new,
        v_new,
        k_cache: kc,
        v_cache: vc,
        k_hist,
        v_hist,
    }
}

impl Data {
    fn inputs(&self, p: &AttnParams) -> AttnInputs<'_> {
        AttnInputs {
            q: &self.q,
            k_new: &self.k_new,
            v_new: &self.v_new,
            k_cache: as_bytes(&self.k_cache, p.cache_bytes()),
            v_cache: as_bytes(&self.v_cache, p.cache_bytes()),
        }
    }
}

/// Plain f64 attention over the logical key/value sequence.
/// `quant_q`: score cached Q8_0 keys with the quantized query (dotprod path).
fn reference(c: &Case, data: &Data, quant_q: bool) -> Vec<f64> {
    let p = &c.p;
    let d = p.head_dim;
    let g = p.n_head / p.n_head_kv;
    let start = p.pos0 - p.n_hist as u64;
    let mut out = vec![0f64; p.n_q * p.n_head * d];
    for t in 0..p.n_q {
        let i = p.pos0 + t as u64;
        let mut lo = start;
        if p.window > 0 && i + 1 >= p.window as u64 {
            lo = lo.max(i + 1 - p.window as u64);
        }
        for head in 0..p.n_head {
            let h = head / g;
            let qrow = &data.q[(t * p.n_head + head) * d..][..d];
            let qf: Vec<f64> = qrow.iter().map(|&v| v as f64).collect();
            let qq = quantize_query(qrow);
            let mut scores = Vec::new();
            let mut vals: Vec<Vec<f64>> = Vec::new();
            for j in lo..=i {
                let (k, v, qv): (Vec<f64>, Vec<f64>, &[f64]) = if j < p.pos0 {
                    let r = (j - start) as usize * p.n_head_kv + h;
                    let qv = if quant_q && p.kv_type == KvType::Q8_0 {
                        &qq
                    } else {
                        &qf
                    };
                    (data.k_hist[r].clone(), data.v_hist[r].clone(), qv)
                } else {
                    let off = ((j - p.pos0) as usize * p.n_head_kv + h) * d;
                    let f = |s: &[f32]| s[off..off + d].iter().map(|&x| x as f64).collect();
                    (f(&data.k_new), f(&data.v_new), &qf)
                };
                let s: f64 = k.iter().zip(qv).map(|(a, b)| a * b).sum::<f64>() * p.scale as f64;
                scores.push(s);
                vals.push(v);
            }
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let sum: f64 = w.iter().sum();
            let o = &mut out[(t * p.n_head + head) * d..][..d];
            for (wj, v) in w.iter().zip(&vals) {
                for (od, vd) in o.iter_mut().zip(v) {
                    *od += wj * vd / sum;
                }
            }
        }
    }
    out
}

/// Largest normwise relative error over the output rows (one per query and head).
fn max_row_err(got: &[f32], want: &[f64], d: usize) -> f64 {
    got.chunks(d)
        .zip(want.chunks(d))
        .map(|(g, w)| {
            let scale = w.iter().fold(0f64, |a, v| a.max(v.abs())).max(1e-30);
            let err = g
                .iter()
                .zip(w)
                .fold(0f64, |a, (x, y)| a.max((*x as f64 - y).abs()));
            if err.is_nan() || g.iter().any(|x| !x.is_finite()) {
                f64::INFINITY
            } else {
                err / scale
            }
        })
        .fold(0f64, f64::max)
}

/// Kernels under test: every available path; on aarch64 both NEON variants.
/// The bool says whether the kernel quantizes the query for Q8_0 keys.
#[cfg_attr(not(target_arch = "aarch64"), allow(unused_mut))]
fn kernels() -> Vec<(String, Kernel, bool)> {
    let mut v: Vec<(String, Kernel, bool)> = available_paths()
        .into_iter()
        .filter(|p| *p != KernelPath::Neon)
        .map(|p| (p.name().to_string(), Kernel::for_path(p).unwrap(), false))
        .collect();
    #[cfg(target_arch = "aarch64")]
    {
        v.push((
            "neon-plain".into(),
            Kernel {
                path: KernelPath::Neon,
                entry: ffi::mk_attention_neon_plain,
            },
            false,
        ));
        if neon_has_dotprod() {
            v.push((
                "neon-dotprod".into(),
                Kernel {
                    path: KernelPath::Neon,
                    entry: ffi::mk_attention_neon_dotprod,
                },
                true,
            ));
        }
    }
    v
}

/// The f64 references of a case: with the query as given, and with it quantized to Q8_0 (what
/// a path that scores Q8_0 keys with integer dot products computes).
struct References {
    exact: Vec<f64>,
    quant_q: Vec<f64>,
}

impl References {
    fn new(c: &Case, data: &Data) -> References {
        References {
            exact: reference(c, data, false),
            quant_q: reference(c, data, true),
        }
    }

    /// The reference a kernel from [`kernels`] is held to.
    fn for_kernel(&self, quant_q: bool) -> &[f64] {
        if quant_q {
            &self.quant_q
        } else {
            &self.exact
        }
    }
}

/// Runs one case through every kernel (single thread) and checks it.
/// Returns the largest errors seen (vs reference, vs scalar).
fn check_case(c: &Case) -> (f64, f64) {
    let data = make_data(c);
    let inputs = data.inputs(&c.p);
    let d = c.p.head_dim;
    let refs = References::new(c, &data);
    let want = &refs.exact;
    let scalar = Kernel::for_path(KernelPath::Scalar).unwrap();
    let mut base = vec![0f32; c.p.n_q * c.p.n_head * d];
    scalar.run(&c.p, &inputs, &mut base, 1).unwrap();
    let e = max_row_err(&base, want, d);
    assert!(e < TOL_REF, "scalar vs f64 reference: {e:e} for {c:?}");
    let (mut worst_ref, mut worst_path) = (e, 0f64);
    for (name, k, quant_q) in kernels() {
        let mut out = vec![0f32; base.len()];
        k.run(&c.p, &inputs, &mut out, 1).unwrap();
        let e = max_row_err(&out, refs.for_kernel(quant_q), d);
        assert!(e < TOL_REF, "{name} vs f64 reference: {e:e} for {c:?}");
        worst_ref = worst_ref.max(e);
        if !(quant_q && c.p.kv_type == KvType::Q8_0) {
            let base64: Vec<f64> = base.iter().map(|&x| x as f64).collect();
            let e = max_row_err(&out, &base64, d);
            assert!(e < TOL_PATH, "{name} vs scalar: {e:e} for {c:?}");
            worst_path = worst_path.max(e);
        }
    }
    (worst_ref, worst_path)
}

const TYPES: [KvType; 3] = [KvType::F32, KvType::F16, KvType::Q8_0];

#[allow(clippy::too_many_arguments)]
fn case(
    d: usize,
    n_head: usize,
    n_kv: usize,
    window: usize,
    ty: KvType,
    n_slots: usize,
    pos0: u64,
    n_hist: usize,
    n_q: usize,
    seed: u64,
) -> Case {
    Case {
        p: AttnParams::dense(d, n_head, n_kv, window, ty, n_slots, pos0, n_hist, n_q),
        q_mag: 1.0,
        seed,
    }
}

#[test]
fn shapes_windows_types_against_reference() {
    let mut seed = 1;
    let (mut wr, mut wp) = (0f64, 0f64);
    for d in [64, 128] {
        for g in [1, 4, 8] {
            for ty in TYPES {
                // history 70 > tile of 32 keys, ring of 96 wrapped (pos0 = 120)
                for window in [0, 5, 20, 200] {
                    for n_q in [1, 7] {
                        seed += 1;
                        let c = case(d, 2 * g, 2, window, ty, 96, 120, 70, n_q, seed);
                        let (a, b) = check_case(&c);
                        wr = wr.max(a);
                        wp = wp.max(b);
                    }
                }
            }
        }
    }
    eprintln!("max error vs f64 reference {wr:e}, vs scalar {wp:e}");
}

#[test]
fn ring_wraparound_at_every_offset() {
    let n_slots = 16;
    let mut seed = 1000;
    for ty in [KvType::F16, KvType::Q8_0] {
        for (n_hist, window, n_q) in [(13, 0, 1), (16, 0, 3), (13, 9, 3), (16, 4, 1)] {
            for pos0 in n_hist as u64..(n_hist + n_slots) as u64 {
                seed += 1;
                check_case(&case(
                    64, 8, 2, window, ty, n_slots, pos0, n_hist, n_q, seed,
                ));
            }
        }
    }
}

#[test]
fn edge_shapes() {
    for ty in TYPES {
        // no history at all (first prefill chunk), window cutting the chunk
        check_case(&case(64, 4, 1, 0, ty, 8, 0, 0, 5, 1));
        check_case(&case(64, 4, 1, 3, ty, 8, 0, 0, 5, 2));
        // full ring, decode
        check_case(&case(128, 32, 8, 0, ty, 40, 40, 40, 1, 3));
        // window 1: only the query's own key
        check_case(&case(64, 4, 2, 1, ty, 8, 20, 8, 4, 4));
        // group of 32 heads (more than MK_MAX_G: processed as two sub-groups)
        check_case(&case(64, 32, 1, 0, ty, 50, 45, 45, 2, 5));
        // head_dim 256 and 32
        check_case(&case(256, 8, 2, 0, ty, 40, 60, 33, 2, 6));
        check_case(&case(32, 8, 2, 10, ty, 40, 60, 33, 2, 7));
        // more query heads than one work unit holds: the kv heads are split into blocks
        // (2 blocks of 8 kv heads; 3 blocks of 2 half-groups; 16 + 4 kv heads)
        check_case(&case(256, 64, 16, 0, ty, 40, 60, 33, 2, 8));
        check_case(&case(256, 96, 3, 0, ty, 40, 60, 33, 2, 9));
        check_case(&case(128, 80, 20, 7, ty, 40, 60, 33, 3, 10));
    }
}

#[test]
fn large_scores_do_not_overflow() {
    // |scores| up to several hundred: exp() without the running max overflows.
    for ty in TYPES {
        let mut c = case(128, 8, 2, 0, ty, 64, 100, 64, 3, 77);
        c.q_mag = 40.0;
        check_case(&c);
    }
}

#[test]
fn padded_layout() {
    // Rows not packed: padding between heads and at the end of each slot
    // (NaN-filled) must never be read.
    for ty in TYPES {
        let mut c = case(64, 8, 2, 0, ty, 24, 30, 20, 2, 99);
        c.p.head_bytes = ty.row_bytes(64) + 12;
        c.p.slot_bytes = 2 * c.p.head_bytes + 40;
        check_case(&c);
        // head-major: one head's slots contiguous
        let mut c = case(64, 8, 2, 0, ty, 24, 30, 20, 2, 98);
        c.p.slot_bytes = ty.row_bytes(64);
        c.p.head_bytes = 24 * c.p.slot_bytes;
        check_case(&c);
    }
}

#[test]
fn thread_splits_and_orders() {
    for (n_head, n_kv, n_q, window) in [
        (8, 1, 1, 0),
        (8, 2, 1, 0),
        (8, 1, 2, 0),
        (8, 2, 3, 40),
        (32, 8, 1, 0),
        (80, 20, 1, 0),
        (80, 20, 2, 30),
    ] {
        for ty in TYPES {
            let c = case(128, n_head, n_kv, window, ty, 128, 300, 100, n_q, 5);
            let data = make_data(&c);
            let inputs = data.inputs(&c.p);
            let refs = References::new(&c, &data);
            let want = &refs.exact;
            for (name, k, quant_q) in kernels() {
                let r = refs.for_kernel(quant_q);
                let mut one = vec![0f32; want.len()];
                k.run(&c.p, &inputs, &mut one, 1).unwrap();
                for nth in [2, 3, 7] {
                    let mut par = vec![f32::NAN; want.len()];
                    k.run(&c.p, &inputs, &mut par, nth).unwrap();
                    let e = max_row_err(&par, r, 128);
                    assert!(e < TOL_REF, "{name} nth={nth} parallel: {e:e} for {c:?}");
                    let mut seq = vec![f32::NAN; want.len()];
                    let order: Vec<usize> = (0..nth).rev().collect();
                    k.run_sequential(&c.p, &inputs, &mut seq, nth, &order)
                        .unwrap();
                    // Same plan, same partial sums: the order changes nothing.
                    assert_eq!(
                        par.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                        seq.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                        "{name} nth={nth}: result depends on thread order"
                    );
                    let one64: Vec<f64> = one.iter().map(|&x| x as f64).collect();
                    let e = max_row_err(&par, &one64, 128);
                    assert!(e < TOL_PATH, "{name} nth={nth} vs 1 thread: {e:e}");
                }
            }
        }
    }
}

#[test]
fn key_range_split_is_used() {
    // One unit, 7 threads: the scratch-based split must be planned.
    let c = case(128, 8, 1, 0, KvType::F16, 64, 64, 64, 1, 1);
    let data = make_data(&c);
    let raw = c.p.to_raw(&data.inputs(&c.p), std::ptr::null_mut());
    assert!(scratch_bytes(&raw, 7) > 0);
    assert_eq!(scratch_bytes(&raw, 1), 0);
}

#[test]
fn validation_errors() {
    let c = case(64, 8, 2, 0, KvType::F16, 16, 20, 10, 2, 1);
    let data = make_data(&c);
    let inputs = data.inputs(&c.p);
    let k = Kernel::for_path(KernelPath::Scalar).unwrap();
    let mut out = vec![0f32; 2 * 8 * 64];
    k.run(&c.p, &inputs, &mut out, 1).unwrap();
    let err = |p: &AttnParams, inputs: &AttnInputs, out_len: usize| {
        let mut o = vec![0f32; out_len];
        match k.run(p, inputs, &mut o, 1) {
            Err(KernelError::Invalid(msg)) => msg,
            other => panic!("expected Invalid, got {other:?} for {p:?}"),
        }
    };
    let n = out.len();
    let mut p = c.p.clone();
    p.head_dim = 48;
    assert!(err(&p, &inputs, n).contains("head_dim"));
    let mut p = c.p.clone();
    p.n_head = 6;
    p.n_head_kv = 4;
    assert!(err(&p, &inputs, n).contains("n_head"));
    let mut p = c.p.clone();
    p.n_hist = 17;
    assert!(err(&p, &inputs, n).contains("n_slots"));
    let mut p = c.p.clone();
    p.pos0 = 5;
    assert!(err(&p, &inputs, n).contains("pos0"));
    let mut p = c.p.clone();
    p.n_slots = 17;
    assert!(err(&p, &inputs, n).contains("k_cache"));
    assert!(err(&c.p, &inputs, n - 1).contains("out"));
    let short = AttnInputs {
        q: &data.q[1..],
        ..inputs
    };
    assert!(err(&c.p, &short, n).contains("q has"));
    let mut p = c.p.clone();
    p.head_bytes = 100;
    p.slot_bytes = 2 * 100;
    assert!(err(&p, &inputs, n).contains("head_bytes"));
    let mut bigger = data.k_cache.clone();
    bigger.push(0);
    let bytes = as_bytes(&bigger, c.p.cache_bytes() + 1);
    let misaligned = AttnInputs {
        k_cache: &bytes[1..],
        ..inputs
    };
    assert!(err(&c.p, &misaligned, n).contains("aligned"));
    let mut o = vec![0f32; n];
    assert!(matches!(
        k.run(&c.p, &inputs, &mut o, 0),
        Err(KernelError::Invalid(_))
    ));
}

#[test]
fn path_selection() {
    assert_eq!(path_for_env_value(Some("scalar")), Ok(KernelPath::Scalar));
    assert_eq!(path_for_env_value(Some(" Scalar ")), Ok(KernelPath::Scalar));
    match path_for_env_value(Some("sse9")) {
        Err(e @ KernelError::UnknownPath(_)) => assert!(e.to_string().contains("sse9")),
        other => panic!("expected UnknownPath, got {other:?}"),
    }
    let avail = available_paths();
    assert_eq!(avail[0], KernelPath::Scalar);
    for p in KernelPath::ALL {
        assert_eq!(KernelPath::from_name(p.name()), Ok(p));
        match path_for_env_value(Some(p.name())) {
            Ok(got) => {
                assert_eq!(got, p);
                assert!(avail.contains(&p));
            }
            Err(e) => {
                assert!(!avail.contains(&p));
                assert!(e.to_string().contains(p.name()), "{e}");
            }
        }
    }
    // The default is the most specialised available path.
    let best = path_for_env_value(None).unwrap();
    assert_eq!(Some(&best), avail.last());
    #[cfg(target_arch = "x86_64")]
    assert!(matches!(
        path_for_env_value(Some("neon")),
        Err(KernelError::Unavailable {
            path: KernelPath::Neon,
            ..
        })
    ));
    #[cfg(target_arch = "aarch64")]
    {
        assert!(avail.contains(&KernelPath::Neon));
        assert!(matches!(
            path_for_env_value(Some("avx2")),
            Err(KernelError::Unavailable {
                path: KernelPath::Avx2,
                ..
            })
        ));
    }
}

#[test]
fn half_conversion_matches_reference() {
    // The C converter (through the scalar kernel on an F16 cache) must agree
    // with f16_to_f64 on every finite half value, including subnormals:
    // one query, one key = one value row whose output equals the row itself.
    let d = 64;
    let p = AttnParams::dense(d, 1, 1, 0, KvType::F16, 1, 1, 1, 1);
    let k = Kernel::for_path(KernelPath::Scalar).unwrap();
    let q = vec![0f32; d];
    let kv_new = vec![0f32; d];
    let mut checked = 0;
    let finite: Vec<u16> = (0..=u16::MAX).filter(|h| h & 0x7c00 != 0x7c00).collect();
    for chunk in finite.chunks(d) {
        if chunk.len() < d {
            break;
        }
        let bytes: Vec<u8> = chunk.iter().flat_map(|h| h.to_le_bytes()).collect();
        let aligned: Vec<u16> = chunk.to_vec();
        let cache =
            unsafe { std::slice::from_raw_parts(aligned.as_ptr().cast::<u8>(), bytes.len()) };
        // Query 0: both keys (the cached row and the new zero row) score 0 and
        // get weight 1/2, so the output is exactly half the cached row.
        let inputs = AttnInputs {
            q: &q,
            k_new: &kv_new,
            v_new: &kv_new,
            k_cache: cache,
            v_cache: cache,
        };
        let mut out = vec![0f32; d];
        k.run(&p, &inputs, &mut out, 1).unwrap();
        for (o, &h) in out.iter().zip(chunk) {
            assert_eq!(*o as f64, f16_to_f64(h) / 2.0, "half {h:#06x}");
            checked += 1;
        }
    }
    assert!(checked > 60000);
}

#[test]
#[cfg(target_arch = "aarch64")]
fn neon_dispatch_matches_cpu() {
    // scripts/test-aarch64 runs the tests on emulated CPUs with and without
    // the dot-product extension and says which one through this variable.
    let expect = std::env::var("MISTRALD_TEST_EXPECT_DOTPROD").ok();
    let has = neon_has_dotprod();
    if let Some(e) = expect.as_deref() {
        assert_eq!(has, e == "1", "HWCAP_ASIMDDP detection");
    }
    assert_eq!(path_for_env_value(None), Ok(KernelPath::Neon));
    assert!(KernelPath::Neon
        .description()
        .contains(if has { "(dotprod)" } else { "no dotprod" }));
}

#[test]
fn selected_path_follows_env_and_c_dispatcher() {
    let value = std::env::var(KERNEL_ENV).ok();
    let expected = path_for_env_value(value.as_deref());
    assert_eq!(selected_path(), expected);
    if let Ok(path) = expected {
        // The C dispatcher mk_attention() was switched to the same path.
        assert_eq!(unsafe { ffi::mk_current_path() }, path.raw());
        let k = Kernel::selected().unwrap();
        assert_eq!(k.path(), path);
    }
}

#[test]
fn split_with_fewer_keys_than_parts() {
    // One unit split 7 ways but only 1..4 keys: most parts are empty
    // (max -inf, sum 0) and must drop out of the merge.
    for n_hist in 0..4 {
        for ty in TYPES {
            let c = case(64, 4, 1, 0, ty, 8, 10, n_hist, 1, 3);
            let data = make_data(&c);
            let inputs = data.inputs(&c.p);
            let refs = References::new(&c, &data);
            let want = &refs.exact;
            for (name, k, quant_q) in kernels() {
                let r = refs.for_kernel(quant_q);
                let mut out = vec![f32::NAN; want.len()];
                k.run(&c.p, &inputs, &mut out, 7).unwrap();
                let e = max_row_err(&out, r, 64);
                assert!(e < TOL_REF, "{name} n_hist={n_hist}: {e:e}");
            }
        }
    }
}
