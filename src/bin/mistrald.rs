//! Minimal entry point (the real CLI replaces it): `mistrald info` prints the
//! attention kernel path; `mistrald bench-attention` runs the kernel
//! microbenchmark.

use std::process::ExitCode;

fn main() -> ExitCode {
    let cmd = std::env::args().nth(1).unwrap_or_default();
    let result = match cmd.as_str() {
        "info" => mistrald::kernels::selected_path().map(|p| {
            println!("attention kernel: {}", p.description());
        }),
        "bench-attention" => mistrald::kernels::bench::bench_attention(
            &mistrald::kernels::bench::BenchOptions::default(),
        )
        .map(|rows| print!("{}", mistrald::kernels::bench::format_table(&rows))),
        _ => {
            eprintln!("usage: mistrald info | bench-attention");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mistrald: {e}");
            ExitCode::FAILURE
        }
    }
}
