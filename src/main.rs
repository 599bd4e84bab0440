//! The `llm-sidecar` binary: parses the command line, then runs the sidecar, checks a config,
//! prints the embedded default, runs the injector or an exec probe. The fake provider of the
//! tests and demos is a binary of its own (`llm-sidecar-fake-provider`), not part of this one.
#![deny(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use llm_sidecar::config::{self, ConfigSource, EMBEDDED_DEFAULT};
use llm_sidecar::settings::{ProcessEnv, Settings};
use llm_sidecar::{telemetry, Sidecar};

mod allocator;

#[global_allocator]
static ALLOCATOR: allocator::Mimalloc = allocator::Mimalloc;

/// Gives memory freed after a burst back to the system. mimalloc returns a freed page to the
/// system only after a delay (`purge_delay`, 1 s), and only when a later free on some thread
/// comes to look: on a sidecar that went quiet after a thousand streams nothing frees any more,
/// and their pages stayed resident (tens of MB, `make bench-memory`). Purging on every free
/// instead costs every request (about 2 µs of CPU, docs/performance.md). This thread looks once
/// every [`COLLECT_EVERY`]; with nothing expired that is a few hundred instructions.
fn collect_freed_memory_while_idle() {
    let spawned = std::thread::Builder::new()
        .name("allocator-purge".into())
        .spawn(|| loop {
            std::thread::sleep(COLLECT_EVERY);
            collect();
        });
    if let Err(err) = spawned {
        eprintln!("llm-sidecar: the allocator's purge thread did not start: {err}");
    }
}

/// Runs the allocator's expired delayed purges (`mi_collect(false)`: not forced, so memory
/// freed within the last `purge_delay` stays for reuse).
#[allow(unsafe_code)]
fn collect() {
    // SAFETY: mi_collect takes no arguments but a flag, touches only the allocator's own state
    // under its own synchronisation, and may be called from any thread at any time.
    unsafe { libmimalloc_sys::mi_collect(false) }
}

const COLLECT_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Exit code for bad usage or settings (EX_USAGE).
const EXIT_USAGE: u8 = 64;

const USAGE: &str = "\
usage:
  llm-sidecar [run] [--config FILE]        serve (config: FILE, $LLM_SIDECAR_CONFIG, or the embedded default)
  llm-sidecar check-config FILE            validate a routing config and exit non-zero with the reasons
  llm-sidecar default-config [--upstream URL]
                                           print the embedded default; with --upstream, every provider's
                                           base_url becomes URL/<provider>/v1 (for offline runs)
  llm-sidecar inject --template FILE --tls-cert FILE --tls-key FILE [--listen ADDR]
                                           run the sidecar injector (admission webhook, HTTPS, default 0.0.0.0:8443)
  llm-sidecar probe live|ready|models      exit 0 when the admin port's /live or /ready, or
                                           $OPENAI_BASE_URL/models, answers (the kubelet's exec probes)
  llm-sidecar bench-providers [--config FILE] [--targets P/M,...] [--stream] ...
                                           measure the config's targets side by side (--help for flags)
  llm-sidecar roi [--config FILE] [--monthly-output-tokens 500M] [--from-stats URL] ...
                                           monthly cost and savings per route (--help for flags)
  llm-sidecar --version";

enum Command {
    Run { config: Option<PathBuf> },
    CheckConfig(PathBuf),
    DefaultConfig { upstream: Option<String> },
    Inject(llm_sidecar::inject::server::InjectArgs),
    Probe(llm_sidecar::probe::Check),
    BenchProviders(Vec<String>),
    Roi(Vec<String>),
    Version,
    Help,
}

fn parse_args(args: &[String]) -> Result<Command, String> {
    let (cmd, rest) = match args.first().map(String::as_str) {
        None => ("run", args),
        Some(flag) if flag.starts_with("--config") => ("run", args),
        Some(cmd) => (cmd, &args[1..]),
    };
    let option = |name: &str| -> Result<Option<String>, String> {
        let mut it = rest.iter();
        let mut found = None;
        while let Some(arg) = it.next() {
            if arg == name {
                found = Some(it.next().cloned().ok_or(format!("{name} needs a value"))?);
            } else if let Some(v) = arg.strip_prefix(&format!("{name}=")) {
                found = Some(v.to_string());
            } else {
                return Err(format!("unexpected argument `{arg}`"));
            }
        }
        Ok(found)
    };
    match cmd {
        "run" => Ok(Command::Run {
            config: option("--config")?.map(PathBuf::from),
        }),
        "check-config" => match rest {
            [file] => Ok(Command::CheckConfig(PathBuf::from(file))),
            _ => Err("check-config takes exactly one FILE".into()),
        },
        "default-config" => Ok(Command::DefaultConfig {
            upstream: option("--upstream")?,
        }),
        "inject" => {
            let mut fields = [None, None, None, None];
            let names = ["--listen", "--template", "--tls-cert", "--tls-key"];
            let mut it = rest.iter();
            while let Some(arg) = it.next() {
                let (name, value) = match arg.split_once('=') {
                    Some((n, v)) => (n, Some(v.to_string())),
                    None => (arg.as_str(), None),
                };
                let slot = names
                    .iter()
                    .position(|n| *n == name)
                    .ok_or(format!("unexpected argument `{arg}`"))?;
                let value = match value {
                    Some(v) => v,
                    None => it.next().cloned().ok_or(format!("{name} needs a value"))?,
                };
                fields[slot] = Some(value);
            }
            let [listen, template, cert, key] = fields;
            let listen = listen.unwrap_or_else(|| "0.0.0.0:8443".into());
            let need = |v: Option<String>, name: &str| {
                v.map(PathBuf::from).ok_or(format!("inject needs {name}"))
            };
            Ok(Command::Inject(llm_sidecar::inject::server::InjectArgs {
                listen: listen
                    .parse()
                    .map_err(|e| format!("--listen {listen}: {e}"))?,
                template: need(template, "--template FILE")?,
                tls_cert: need(cert, "--tls-cert FILE")?,
                tls_key: need(key, "--tls-key FILE")?,
            }))
        }
        "probe" => match rest {
            [check] => check.parse().map(Command::Probe),
            _ => Err("probe takes one of live, ready, models".into()),
        },
        "bench-providers" => Ok(Command::BenchProviders(rest.to_vec())),
        "roi" => Ok(Command::Roi(rest.to_vec())),
        "--version" | "-V" | "version" => Ok(Command::Version),
        "--help" | "-h" | "help" => Ok(Command::Help),
        other => Err(format!("unknown command `{other}`")),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = match parse_args(&args) {
        Ok(c) => c,
        Err(why) => {
            eprintln!("llm-sidecar: {why}\n{USAGE}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match command {
        Command::Help => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Command::Version => {
            println!("llm-sidecar {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::CheckConfig(path) => check_config(&path),
        Command::DefaultConfig { upstream } => {
            print!("{}", default_config(upstream.as_deref()));
            ExitCode::SUCCESS
        }
        Command::Run { config } => run(config),
        Command::Inject(args) => inject(args),
        Command::BenchProviders(args) => llm_sidecar::bench_providers::cli(&args),
        Command::Roi(args) => llm_sidecar::roi::cli(&args),
        Command::Probe(check) => {
            match llm_sidecar::probe::run(&check, &ProcessEnv, std::time::Duration::from_secs(2)) {
                Ok(summary) => {
                    println!("{summary}");
                    ExitCode::SUCCESS
                }
                Err(why) => {
                    eprintln!("llm-sidecar probe: {why}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("llm-sidecar")
        .build()
}

fn check_config(path: &PathBuf) -> ExitCode {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(err) => {
            eprintln!("{}: cannot read: {err}", path.display());
            return ExitCode::FAILURE;
        }
    };
    match config::layers::check(&text, ConfigSource::File(path.clone()), &ProcessEnv) {
        Ok(snapshot) => {
            println!(
                "{}: valid{} ({} providers, {} routes)",
                path.display(),
                match snapshot.source {
                    ConfigSource::Embedded => " ConfigMap, on top of the embedded routing",
                    ConfigSource::ConfigMap { .. } => " ConfigMap",
                    ConfigSource::File(_) => "",
                },
                snapshot.providers.len(),
                snapshot.routes.len()
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("{}: invalid", path.display());
            for e in &err.0 {
                eprintln!("  {e}");
            }
            ExitCode::FAILURE
        }
    }
}

/// The embedded default, optionally with every provider pointed at one local base URL.
fn default_config(upstream: Option<&str>) -> String {
    let Some(upstream) = upstream else {
        return EMBEDDED_DEFAULT.to_string();
    };
    let upstream = upstream.trim_end_matches('/');
    let mut provider = String::new();
    let mut out = String::with_capacity(EMBEDDED_DEFAULT.len());
    for line in EMBEDDED_DEFAULT.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if indent == 2 && trimmed.ends_with(':') && !trimmed.starts_with('#') {
            provider = trimmed.trim_end_matches(':').to_string();
        }
        if indent == 4 && trimmed.starts_with("base_url:") {
            out.push_str(&format!("    base_url: {upstream}/{provider}/v1\n"));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn inject(args: llm_sidecar::inject::server::InjectArgs) -> ExitCode {
    let (settings, rt) = match settings_and_runtime() {
        Ok(pair) => pair,
        Err(code) => return code,
    };
    rt.block_on(async move {
        telemetry::init_logging(settings.log_format);
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let terminated = termination();
        tokio::spawn(async move {
            terminated.await;
            tracing::info!("shutting down the injector");
            let _ = stop.send(true);
        });
        match llm_sidecar::inject::server::run(args, stopped).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("llm-sidecar inject: {err}");
                ExitCode::from(EXIT_USAGE)
            }
        }
    })
}

/// The settings from the environment (every problem printed, exit 64) and the runtime, with
/// the process's one crypto provider installed before any TLS is set up.
fn settings_and_runtime() -> Result<(Settings, tokio::runtime::Runtime), ExitCode> {
    let settings = Settings::from_env(&ProcessEnv).map_err(|errors| {
        eprintln!("llm-sidecar: invalid settings:");
        for e in errors {
            eprintln!("  {e}");
        }
        ExitCode::from(EXIT_USAGE)
    })?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = runtime().map_err(|err| {
        eprintln!("llm-sidecar: cannot start the runtime: {err}");
        ExitCode::FAILURE
    })?;
    Ok((settings, rt))
}

fn run(config_flag: Option<PathBuf>) -> ExitCode {
    let (mut settings, rt) = match settings_and_runtime() {
        Ok(pair) => pair,
        Err(code) => return code,
    };
    if config_flag.is_some() {
        settings.config_path = config_flag;
    }
    collect_freed_memory_while_idle();
    rt.block_on(async move {
        // Trace export runs on the runtime, so logging and tracing start inside it.
        let traces = match telemetry::init(
            settings.log_format,
            settings.otel.as_ref(),
            settings.connect_timeout,
            settings.extra_ca_file.as_deref(),
        ) {
            Ok(t) => t,
            Err(err) => {
                eprintln!("llm-sidecar: {err}");
                return ExitCode::from(EXIT_USAGE);
            }
        };
        if let Some(otel) = &settings.otel {
            tracing::info!(endpoint = %otel.endpoint, protocol = ?otel.protocol, "exporting traces over OTLP");
        }
        let (text, source) = match llm_sidecar::initial_config(&settings) {
            Ok(pair) => pair,
            Err(err) => {
                eprintln!("llm-sidecar: {err}");
                return ExitCode::from(EXIT_USAGE);
            }
        };
        let terminated = termination();
        let sidecar = match Sidecar::start(&settings, &text, source, Arc::new(ProcessEnv)).await {
            Ok(s) => s,
            Err(err) => {
                eprintln!("llm-sidecar: {err}");
                return ExitCode::from(EXIT_USAGE);
            }
        };
        terminated.await;
        tracing::info!(grace = ?settings.shutdown_grace, "shutting down: draining in-flight requests");
        sidecar.shutdown();
        let drained = sidecar.wait().await;
        if let Some(traces) = traces {
            // Spans of the last requests are sent before the process exits.
            traces.shutdown(std::time::Duration::from_secs(3)).await;
        }
        if drained {
            tracing::info!("drained; bye");
        } else {
            tracing::warn!("shutdown grace period ended with requests still in flight");
        }
        ExitCode::SUCCESS
    })
}

/// Resolves on SIGTERM or ctrl-c; both are listened for from the moment this returns, so a
/// signal that comes while the sidecar is still starting stops it cleanly instead of killing it
/// with the default action.
fn termination() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let interrupt = signal(SignalKind::interrupt());
    async move {
        match (term, interrupt) {
            (Ok(mut term), Ok(mut interrupt)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = interrupt.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn default_config_can_point_every_provider_at_a_local_upstream() {
        let text = default_config(Some("http://127.0.0.1:9000/"));
        let snapshot = config::compile(
            &text,
            ConfigSource::Embedded,
            1,
            &HashMap::<String, String>::new(),
        )
        .unwrap();
        for (name, provider) in &snapshot.providers {
            assert_eq!(
                provider.base_url,
                format!("http://127.0.0.1:9000/{name}/v1")
            );
        }
        assert_eq!(
            snapshot.routes.len(),
            config::compile(
                EMBEDDED_DEFAULT,
                ConfigSource::Embedded,
                1,
                &HashMap::<String, String>::new()
            )
            .unwrap()
            .routes
            .len()
        );
    }

    #[test]
    fn arguments_parse() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(matches!(
            parse_args(&args(&[])),
            Ok(Command::Run { config: None })
        ));
        assert!(matches!(
            parse_args(&args(&["--config", "x.yaml"])),
            Ok(Command::Run { config: Some(_) })
        ));
        assert!(matches!(
            parse_args(&args(&["check-config", "x.yaml"])),
            Ok(Command::CheckConfig(_))
        ));
        assert!(parse_args(&args(&["run", "--nope"])).is_err());
        assert!(parse_args(&args(&["frobnicate"])).is_err());
        // The fake provider is its own binary (llm-sidecar-fake-provider), not a subcommand.
        assert!(parse_args(&args(&["fake-provider", "--listen", "127.0.0.1:0"])).is_err());
    }
}
