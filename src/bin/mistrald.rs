//! mistrald command line (plugin tools for now; the daemon's own commands are
//! wired in by the engine work).

use clap::Parser;
use mistrald::plugins::command::{run_command, PluginCommand};

#[derive(Debug, Parser)]
#[command(name = "mistrald", version, about = "Mistral inference daemon")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Check, try or benchmark a WebAssembly post-processing plugin.
    Plugin {
        #[command(subcommand)]
        cmd: PluginCommand,
    },
}

fn main() -> std::process::ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Plugin { cmd } => run_command(cmd),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("mistrald: error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
