//! The mistrald binary: see `mistrald --help`.

fn main() {
    std::process::exit(mistrald::cli::main());
}
