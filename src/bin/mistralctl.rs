//! `mistralctl`: the command-line client of the mistrald daemon.
fn main() {
    std::process::exit(mistrald::ctl::main());
}
