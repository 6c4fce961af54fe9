//! Build script: compiles the native attention and matrix-product kernels in
//! `vendor/kernels/` with `cc` and generates their Rust bindings with `bindgen`.
//!
//! Each SIMD path's source is compiled with its own target flags (AVX2,
//! AVX-VNNI, AVX-512, AVX-512 VNNI, NEON dot product) and never with
//! `-march=native`, so one binary
//! runs on any CPU of its architecture; the path is picked at run time
//! (`vendor/kernels/cpu_features.c`, `src/kernels/mod.rs`). The bindings are
//! written to `$OUT_DIR/mk_bindings.rs` and included by `src/kernels/ffi.rs`.

use std::env;
use std::path::PathBuf;

const KERNEL_DIR: &str = "vendor/kernels";

fn main() {
    let target_arch = env::var("CARGO_CFG_TARGET_ARCH").expect("CARGO_CFG_TARGET_ARCH");

    println!("cargo:rerun-if-changed={KERNEL_DIR}");
    for entry in std::fs::read_dir(KERNEL_DIR).expect("vendor/kernels") {
        let path = entry.expect("vendor/kernels entry").path();
        println!("cargo:rerun-if-changed={}", path.display());
    }

    // Portable files: no target flags at all.
    // Every file gets the architecture's baseline `-march` explicitly (so
    // neither a distribution's compiler default nor `-C target-cpu=native`
    // leaks in), and the SIMD files add their own extensions on top.
    let (base, mut sources): (&[&str], Vec<(&str, &[&str])>) = match target_arch.as_str() {
        "x86_64" => (&["-march=x86-64"], vec![]),
        "aarch64" => (&["-march=armv8-a"], vec![]),
        _ => (&[], vec![]),
    };
    sources.push(("attn_scalar.c", &[]));
    sources.push(("cpu_features.c", &[]));
    sources.push(("mm_scalar.c", &[]));
    sources.push(("mm_pack.c", &[]));
    const AVX2: &[&str] = &["-mavx2", "-mfma", "-mf16c"];
    const AVX512: &[&str] = &[
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mf16c",
        "-mfma",
    ];
    match target_arch.as_str() {
        "x86_64" => {
            sources.push(("attn_avx2.c", AVX2));
            sources.push(("attn_avx512.c", AVX512));
            sources.push(("mm_avx2.c", AVX2));
            sources.push(("mm_avxvnni.c", &["-mavx2", "-mfma", "-mf16c", "-mavxvnni"]));
            // The AVX-VNNI code with EVEX vpdpbusd: a test twin for AVX-512 VNNI CPUs.
            sources.push((
                "mm_avxvnni_evex.c",
                &[
                    "-mavx2",
                    "-mfma",
                    "-mf16c",
                    "-mavx512f",
                    "-mavx512bw",
                    "-mavx512vl",
                    "-mavx512vnni",
                ],
            ));
            sources.push(("mm_avx512.c", AVX512));
            sources.push((
                "mm_avx512vnni.c",
                &[
                    "-mavx512f",
                    "-mavx512bw",
                    "-mavx512vl",
                    "-mavx512dq",
                    "-mf16c",
                    "-mfma",
                    "-mavx512vnni",
                ],
            ));
        }
        "aarch64" => {
            sources.push(("attn_neon.c", &[]));
            sources.push(("attn_neon_dotprod.c", &["-march=armv8.2-a+dotprod"]));
            sources.push(("mm_neon.c", &[]));
            sources.push(("mm_neon_dotprod.c", &["-march=armv8.2-a+dotprod"]));
        }
        _ => {}
    }

    // One static library per flag set, so flags never leak between paths.
    for (file, flags) in &sources {
        let mut build = cc::Build::new();
        build
            .file(format!("{KERNEL_DIR}/{file}"))
            .include(KERNEL_DIR)
            .std("c11")
            .opt_level(3)
            .warnings(true)
            .extra_warnings(true)
            .inherit_rustflags(false)
            .flag_if_supported("-fno-math-errno");
        // The last -march wins: the dotprod file's own one replaces the base.
        for flag in base.iter().chain(flags.iter()) {
            build.flag(flag);
        }
        let lib = format!("mk_{}", file.trim_end_matches(".c"));
        build.compile(&lib);
    }

    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let bindings = bindgen::Builder::default()
        .header(format!("{KERNEL_DIR}/mistrald_kernels.h"))
        .allowlist_function("mk_.*")
        .allowlist_type("mk_.*")
        .allowlist_var("MK_.*")
        .rustified_enum("mk_path")
        .rustified_enum("mk_mm_path")
        .derive_default(true)
        .layout_tests(true)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
        .generate()
        .expect("bindgen failed on vendor/kernels/mistrald_kernels.h");
    bindings
        .write_to_file(out.join("mk_bindings.rs"))
        .expect("writing mk_bindings.rs");
}
