//! The `llm-sidecar-fake-provider` binary: the fake OpenAI-compatible provider on one address,
//! for the demo, `make run`, the benchmarks, the soak, the Python tests and the kind e2e.
//!
//! Prints `fake provider listening on http://ADDR` on stdout once it accepts connections (the
//! scripts wait for that line; with `--listen 127.0.0.1:0` it names the port picked), logs to
//! stderr (`RUST_LOG`, default `info`) and serves until ctrl-c or SIGTERM.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for bad usage (EX_USAGE), as the product's.
const EXIT_USAGE: u8 = 64;
const DEFAULT_LISTEN: &str = "127.0.0.1:9000";

const USAGE: &str = "\
usage:
  llm-sidecar-fake-provider [--listen ADDR]   serve the fake OpenAI-compatible provider (default 127.0.0.1:9000)
  llm-sidecar-fake-provider --version

Faults are chosen by the request's model name: see the fake_provider crate's documentation.";

#[derive(Debug, PartialEq)]
enum Command {
    Serve(SocketAddr),
    Version,
    Help,
}

fn parse_args(args: &[String]) -> Result<Command, String> {
    let mut listen = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--help" | "-h" | "help" => return Ok(Command::Help),
            "--version" | "-V" | "version" => return Ok(Command::Version),
            "--listen" => {
                listen = Some(it.next().cloned().ok_or("--listen needs a value")?);
            }
            other => match other.strip_prefix("--listen=") {
                Some(value) => listen = Some(value.to_string()),
                None => return Err(format!("unexpected argument `{other}`")),
            },
        }
    }
    let listen = listen.unwrap_or_else(|| DEFAULT_LISTEN.into());
    listen
        .parse()
        .map(Command::Serve)
        .map_err(|e| format!("--listen {listen}: {e}"))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let addr = match parse_args(&args) {
        Ok(Command::Serve(addr)) => addr,
        Ok(Command::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("llm-sidecar-fake-provider {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(why) => {
            eprintln!("llm-sidecar-fake-provider: {why}\n{USAGE}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .try_init();
    let served = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("fake-provider")
        .build()
        .and_then(|rt| rt.block_on(fake_provider::run_standalone(addr)));
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("llm-sidecar-fake-provider: {err}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn arguments_parse() {
        let default: SocketAddr = DEFAULT_LISTEN.parse().unwrap();
        assert_eq!(parse_args(&args(&[])), Ok(Command::Serve(default)));
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        assert_eq!(
            parse_args(&args(&["--listen", "127.0.0.1:0"])),
            Ok(Command::Serve(any))
        );
        assert_eq!(
            parse_args(&args(&["--listen=127.0.0.1:0"])),
            Ok(Command::Serve(any))
        );
        assert_eq!(parse_args(&args(&["--help"])), Ok(Command::Help));
        assert_eq!(parse_args(&args(&["--version"])), Ok(Command::Version));
        assert!(parse_args(&args(&["--listen"])).is_err());
        assert!(parse_args(&args(&["--listen", "nowhere"])).is_err());
        assert!(parse_args(&args(&["fake-provider"])).is_err());
    }
}
