//! `tenure`: collector, exporter and demo. Parses the command line and configuration,
//! then hands over to the role's `run`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use tenure_node::config::{self, CollectorConfig, ExporterConfig, SinkConfig};
use tenure_node::shell::shutdown_signal;

/// mimalloc rather than glibc's malloc: a collector allocates a batch's vectors on one
/// thread and frees them on another, where glibc spent about a tenth of the collector's
/// CPU in `malloc`, `free` and `malloc_consolidate` (README, Performance).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (its `mimalloc.h`, v2 and v3 alike), which
/// `libmimalloc-sys` does not name. A test below checks it against the default.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long mimalloc keeps freed memory before giving it back to the OS. A collector
/// frees batch-sized vectors (megabytes) many times a second and allocates them again at
/// once: with mimalloc's default of one second, each came back as fresh pages, faulted in
/// and zeroed by the kernel, about 5% of a collector's CPU under load (paired loadgen
/// runs, README Performance). An idle collector still returns its memory, ten seconds
/// later.
const PURGE_DELAY_MS: std::ffi::c_long = 10_000;

#[allow(
    unsafe_code,
    reason = "mimalloc's option setter is a C function; it only stores the value"
)]
fn tune_allocator() {
    // SAFETY: `mi_option_set` stores an integer in mimalloc's option table (an atomic
    // store); the option index is in range (checked by `purge_delay_option_is_the_one_named`).
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) }
}

#[derive(Parser, Debug)]
#[command(
    name = "tenure",
    version,
    about = "Attributes every TCP flow to the workloads on both ends, correctly even while IPs are reused."
)]
struct Cli {
    /// Log format.
    #[arg(
        long,
        value_enum,
        default_value = "text",
        env = "TENURE_LOG_FORMAT",
        global = true
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a collector: join the region, accept exporter batches, attribute, write the sink.
    Collector {
        /// The collector's TOML configuration.
        #[arg(long, env = "TENURE_CONFIG")]
        config: PathBuf,
        /// Overrides `node_id`.
        #[arg(long, env = "TENURE_NODE_ID")]
        node_id: Option<String>,
        /// Overrides `gossip_addr`.
        #[arg(long, env = "TENURE_GOSSIP_ADDR")]
        gossip_addr: Option<std::net::SocketAddr>,
        /// Overrides `data_addr`.
        #[arg(long, env = "TENURE_DATA_ADDR")]
        data_addr: Option<std::net::SocketAddr>,
        /// Overrides `http_addr`.
        #[arg(long, env = "TENURE_HTTP_ADDR")]
        http_addr: Option<std::net::SocketAddr>,
        /// Overrides `seeds` (comma-separated gossip addresses).
        #[arg(long, env = "TENURE_SEEDS", value_delimiter = ',')]
        seeds: Option<Vec<std::net::SocketAddr>>,
        /// Overrides the sink directory (files sink).
        #[arg(long, env = "TENURE_SINK_DIR")]
        sink_dir: Option<PathBuf>,
    },
    /// Run an exporter: capture (or synthesize) flows and heartbeat them to a collector.
    Exporter {
        /// The exporter's TOML configuration.
        #[arg(long, env = "TENURE_CONFIG")]
        config: Option<PathBuf>,
        /// `stdout`: print captured flows as NDJSON here, send nothing.
        #[arg(long, value_enum, default_value = "collector")]
        output: Output,
        /// Overrides `collectors` (comma-separated data addresses).
        #[arg(long, env = "TENURE_COLLECTORS", value_delimiter = ',')]
        collectors: Option<Vec<std::net::SocketAddr>>,
    },
    /// A two-region cluster of three collectors each on loopback, a synthetic fleet that
    /// reuses IPs quickly, and the legacy event-only attributor on the same flows.
    Demo {
        /// Stop after this many seconds of fleet traffic (default: until Ctrl-C).
        #[arg(long)]
        duration_secs: Option<u64>,
        /// Seed of the synthetic fleet.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Where the collectors write their sink files (default: a new temporary folder).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Do not try to capture this host's traffic with eBPF.
        #[arg(long)]
        no_capture: bool,
    },
    /// Makes a fresh exporter (or cluster) key: 64 hex digits in a new file, 0640. With
    /// `--exporter-id` and `--key-id`, prints the exporter registry entry that names it.
    Keygen {
        /// The key file to create; an existing file is never overwritten.
        #[arg(long)]
        out: PathBuf,
        /// The exporter the key is for (its `exporter_id`).
        #[arg(long, requires = "key_id")]
        exporter_id: Option<u64>,
        /// The key's id in envelopes, unique in the registry.
        #[arg(long, requires = "exporter_id")]
        key_id: Option<u32>,
    },
    /// Starts a local cluster of collector processes, drives it with synthetic exporters
    /// as fast as it acknowledges, and measures flows attributed per collector CPU-second
    /// (CPU time from /proc), attribution delay, memory per tracked IP and replication
    /// cost. Ends with one RESULT line. See the README's "Performance" section.
    Loadgen {
        #[command(flatten)]
        options: tenure_node::loadgen::LoadOptions,
        /// Where configs, journals, logs and sink files go (default: a new temporary
        /// folder, removed at the end unless --keep).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Keep the run's folder (sink files, logs) at the end.
        #[arg(long)]
        keep: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Collector,
    Stdout,
}

fn init_logs(format: LogFormat, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TENURE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tenure: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tenure: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Collector {
            config: path,
            node_id,
            gossip_addr,
            data_addr,
            http_addr,
            seeds,
            sink_dir,
        } => {
            init_logs(cli.log_format, "info");
            let mut config: CollectorConfig = config::load(&path)?;
            if let Some(v) = node_id {
                config.node_id = v;
            }
            if let Some(v) = gossip_addr {
                config.gossip_addr = v;
            }
            if let Some(v) = data_addr {
                config.data_addr = v;
            }
            if let Some(v) = http_addr {
                config.http_addr = v;
            }
            if let Some(v) = seeds {
                config.seeds = v;
            }
            if let Some(dir) = sink_dir {
                match &mut config.sink {
                    SinkConfig::Files { dir: d, .. } | SinkConfig::Parquet { dir: d, .. } => {
                        *d = dir;
                    }
                    SinkConfig::Stdout => {}
                }
            }
            let (bound_tx, bound_rx) =
                tokio::sync::oneshot::channel::<tenure_node::shell::collector::Bound>();
            let printer = tokio::spawn(async move {
                if let Ok(b) = bound_rx.await {
                    // One line for scripts and tests to read the chosen ports from.
                    println!("{}", tenure_node::listening::Listening::line(&b));
                }
            });
            tenure_node::shell::collector::run_reloadable(
                config,
                Some(path),
                shutdown_signal(),
                Some(bound_tx),
                None,
            )
            .await?;
            let _ = printer.await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Exporter {
            config: path,
            output,
            collectors,
        } => {
            init_logs(cli.log_format, "info");
            let to_stdout = output == Output::Stdout;
            let mut config: ExporterConfig = match path {
                Some(p) => config::load(&p)?,
                None if to_stdout => config::parse(
                    "exporter_id = 0\nregion = \"local\"\n",
                    std::path::Path::new("(defaults)"),
                )?,
                None => anyhow::bail!("--config is required unless --output stdout"),
            };
            if let Some(c) = collectors {
                config.collectors = c;
            }
            tenure_node::exporter::run(config, to_stdout, shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Loadgen {
            mut options,
            dir,
            keep,
        } => {
            init_logs(cli.log_format, "warn");
            let temporary = dir.is_none();
            let dir = dir.unwrap_or_else(|| {
                std::env::temp_dir().join(format!("tenure-loadgen-{}", std::process::id()))
            });
            options.dir = dir.clone();
            let result = tenure_node::loadgen::run(options).await;
            if temporary && !keep {
                let _ = std::fs::remove_dir_all(&dir);
            } else {
                println!("run folder: {}", dir.display());
            }
            let report = result.context("loadgen")?;
            print!("{}", tenure_node::loadgen::describe(&report));
            println!("{}", report.result_line());
            let sane = report.sinks.misattributed == 0 && report.flows_lost == 0;
            Ok(if sane {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
        Command::Keygen {
            out,
            exporter_id,
            key_id,
        } => {
            tenure_node::registry::keygen(&out)
                .with_context(|| format!("writing the key file {}", out.display()))?;
            if let (Some(exporter_id), Some(key_id)) = (exporter_id, key_id) {
                print!(
                    "{}",
                    tenure_node::registry::entry_snippet(exporter_id, key_id, &out)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo {
            duration_secs,
            seed,
            dir,
            no_capture,
        } => {
            init_logs(cli.log_format, "warn");
            let dir = match dir {
                Some(d) => d,
                None => std::env::temp_dir().join(format!("tenure-demo-{}", std::process::id())),
            };
            let options = tenure_node::demo::DemoOptions {
                duration_secs,
                seed,
                dir,
                capture: !no_capture,
            };
            let tally = tenure_node::demo::run(options, shutdown_signal())
                .await
                .context("demo")?;
            println!("{}", tally.result_line());
            Ok(if tally.misattributed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The index names mimalloc's purge delay: read there before anything sets it, the
    /// value is mimalloc v3's default for that option, one second.
    #[test]
    #[allow(unsafe_code, reason = "reads one of mimalloc's options")]
    fn purge_delay_option_is_the_one_named() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            eprintln!("SKIPPED: MIMALLOC_PURGE_DELAY is set, so the default cannot be read");
            return;
        }
        // SAFETY: reads an integer from mimalloc's option table.
        let delay = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(
            delay, 1_000,
            "option {MI_OPTION_PURGE_DELAY} is not the purge delay"
        );
    }
}
