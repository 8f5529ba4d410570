//! The `cobbyd` binary: parses the command line and hands over to the
//! daemon, a client command, the demo or the simulator.

use clap::{CommandFactory, Parser};
use cobbyd::cli::{Cli, Command};
use cobbyd::{commands, config, control_client::Client, daemon, lifecycle};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    ExitCode::from(dispatch(cli))
}

/// Lets a one-shot command die quietly when its reader goes away
/// (`cobbyd products X | head`), as command-line tools do, instead of
/// panicking in `println!`. The daemon and the demo keep Rust's default
/// (SIGPIPE ignored): they have sockets and children to look after.
fn quiet_sigpipe() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: installs the default disposition, no handler code runs; done
    // before any thread is started.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}

fn dispatch(cli: Cli) -> u8 {
    if !matches!(
        cli.command,
        Command::Run(_) | Command::Demo(_) | Command::Simulate(_)
    ) {
        quiet_sigpipe();
    }
    match cli.command {
        Command::Run(_) => lifecycle::run(cli.config),
        Command::CheckConfig(_) => match config::load(cli.config.as_deref()) {
            Ok(l) => {
                match &l.path {
                    Some(p) => println!("{}: OK", p.display()),
                    None => println!(
                        "{}: absent, built-in defaults apply: OK",
                        config::DEFAULT_CONFIG_PATH
                    ),
                }
                0
            }
            Err(e) => {
                eprintln!("{e}");
                daemon::EX_CONFIG
            }
        },
        Command::CheckState(a) => cobbyd::check::run(cli.config.as_deref(), a.json),
        Command::Manpage(_) => {
            let man = clap_mangen::Man::new(Cli::command()).date(man_date());
            let mut out = std::io::stdout();
            match man.render(&mut out) {
                Ok(()) => 0,
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => 0,
                Err(e) => {
                    eprintln!("cobbyd: {e}");
                    1
                }
            }
        }
        Command::Completions { shell, .. } => {
            clap_complete::generate(shell, &mut Cli::command(), "cobbyd", &mut std::io::stdout());
            0
        }
        Command::Demo(args) => cobbyd::demo::run(args),
        Command::Simulate(s) => {
            cobbyd::logging::init_client();
            match tokio::runtime::Runtime::new()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(cobbyd::sim::run_simulate(s.args)))
            {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("cobbyd simulate: {e:#}");
                    1
                }
            }
        }
        command => client_command(cli.config, cli.socket, command),
    }
}

/// The man page's date: `SOURCE_DATE_EPOCH` for reproducible packages,
/// today otherwise.
fn man_date() -> String {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .and_then(|secs| chrono::DateTime::from_timestamp(secs, 0))
        .unwrap_or_else(chrono::Utc::now)
        .format("%Y-%m-%d")
        .to_string()
}

/// Commands that talk to a running daemon.
fn client_command(
    config_path: Option<std::path::PathBuf>,
    socket: Option<std::path::PathBuf>,
    command: Command,
) -> u8 {
    cobbyd::logging::init_client();
    let socket = match socket {
        Some(s) => s,
        None => match config::load(config_path.as_deref()) {
            Ok(l) => l.config.daemon.socket,
            Err(e) => {
                eprintln!("cobbyd: {e}");
                return daemon::EX_CONFIG;
            }
        },
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cobbyd: cannot start the async runtime: {e}");
            return 1;
        }
    };
    let client = Client::new(&socket);
    runtime.block_on(async {
        match &command {
            Command::Status(a) => commands::status(&client, a).await,
            Command::Shop(c) => commands::shop(&client, c).await,
            Command::Sync(a) => commands::sync(&client, a).await,
            Command::Products(a) => commands::products(&client, a).await,
            _ => 2,
        }
    })
}
