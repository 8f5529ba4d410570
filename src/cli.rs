//! The command line: one binary, subcommands. The definitions here also
//! generate the man page and shell completions (`cobbyd manpage`,
//! `cobbyd completions SHELL`), so they stay in step with the code.

use crate::shop::{AuthMode, Platform};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// Keeps Magento shops connected and their product catalogs mirrored.
///
/// `cobbyd run` is the daemon (what systemd starts). Every other command is
/// a client that talks to it over its control socket, except `check-config`,
/// `check-state`, `demo`, `simulate`, `manpage` and `completions`.
#[derive(Debug, Parser)]
#[command(name = "cobbyd", version, about, long_about, propagate_version = true)]
pub struct Cli {
    /// Configuration file. When not given, /etc/cobbyd/cobbyd.toml is read if
    /// it exists, else built-in defaults apply.
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        env = "COBBYD_CONFIG",
        help_heading = GLOBAL
    )]
    pub config: Option<PathBuf>,

    /// Control socket of the daemon (default: the config's daemon.socket).
    #[arg(long, global = true, value_name = "PATH", help_heading = GLOBAL)]
    pub socket: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

/// The help heading of `--config` and `--socket`, apart from each command's
/// own options.
const GLOBAL: &str = "Global options";

/// `--config` and `--socket` for a command that uses neither (the demo and
/// the simulator make their own): still accepted, so a script may pass them
/// to every command, but left out of its help. (A command that has its own
/// argument of a global's name does not get the global one.)
#[derive(Debug, Args)]
pub struct Unused {
    #[arg(long, hide = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[arg(long, hide = true, value_name = "PATH")]
    socket: Option<PathBuf>,
}

/// `--socket` for a command that does not talk to the daemon.
#[derive(Debug, Args)]
pub struct NoSocket {
    #[arg(long, hide = true, value_name = "PATH")]
    socket: Option<PathBuf>,
}

/// A Magento 1 or 2 shop, as the possible values of `--platform` say.
const PLATFORM_HELP: &str =
    "Which Magento the shop runs: magento2 (2.x, REST) or magento1 (1.x, XML-RPC)";

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground.
    Run(NoSocket),
    /// Validate the configuration; exit 0, or 78 with `file: key: problem`
    /// for every problem found.
    CheckConfig(NoSocket),
    /// Check the state directory offline (the daemon stopped) and report
    /// every broken invariant.
    ///
    /// Exit status: 0 consistent; 1 problems found; 2 the state cannot be
    /// checked (a running daemon holds it, it is missing, or it was written
    /// by a newer cobbyd); 78 configuration error.
    CheckState(CheckStateArgs),
    /// Show the daemon's and every shop's health.
    ///
    /// Exit status: 0 every shop healthy; 1 running, some shop not healthy;
    /// 3 daemon not running or socket unreachable; 4 permission denied or
    /// a protocol error.
    Status(StatusArgs),
    /// Register, inspect, test, rotate and remove shops.
    #[command(subcommand)]
    Shop(ShopCommand),
    /// Start a sync of a shop now.
    Sync(SyncArgs),
    /// Stream a shop's mirrored catalog to stdout.
    Products(ProductsArgs),
    /// Start a simulated shop and a daemon in a temporary directory, add the
    /// shop, sync it and show the result.
    Demo(DemoArgs),
    /// Run the built-in Magento 1 and 2 simulator (for tests, demos and
    /// benchmarks).
    Simulate(SimulateCommand),
    /// Print the man page (roff) to stdout.
    #[command(hide = true)]
    Manpage(Unused),
    /// Print a shell completion script to stdout.
    #[command(hide = true)]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
        #[command(flatten)]
        unused: Unused,
    },
}

#[derive(Debug, Args)]
pub struct SimulateCommand {
    #[command(flatten)]
    pub args: crate::sim::SimulateArgs,
    #[command(flatten)]
    unused: Unused,
}

#[derive(Debug, Args)]
pub struct CheckStateArgs {
    /// Stable JSON for scripts instead of the text report.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    no_socket: NoSocket,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Only this shop (its name, as given to `shop add`).
    pub shop: Option<String>,
    /// Stable JSON for scripts instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum ShopCommand {
    /// Register a shop. Tests the connection first and refuses a failing
    /// shop unless --no-verify.
    Add(ShopAddArgs),
    /// List registered shops (secrets redacted).
    List {
        /// Stable JSON for scripts instead of the table.
        #[arg(long)]
        json: bool,
        /// List instead the mirrors kept by `shop remove` without --purge
        /// (`products NAME` exports one, `shop purge NAME` drops it).
        #[arg(long)]
        retained: bool,
    },
    /// Show one shop (secrets redacted).
    Show {
        /// The shop's name, as given to `shop add`.
        name: String,
        /// Stable JSON for scripts instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Probe a shop now and print the diagnosis; exit 0 if it answers and
    /// accepts the credentials.
    Test {
        /// The shop's name, as given to `shop add`.
        name: String,
        /// Stable JSON for scripts instead of the text.
        #[arg(long)]
        json: bool,
    },
    /// Replace a shop's credentials: tested first, swapped atomically, the
    /// old ones kept if the test fails.
    Rotate {
        /// The shop's name, as given to `shop add`.
        name: String,
        /// TOML file with the new credentials, or - for standard input.
        #[arg(long, value_name = "PATH|-")]
        credentials_file: PathBuf,
    },
    /// Unregister a shop and stop its jobs. Its mirrored products are kept
    /// (see `shop list --retained`) unless --purge.
    Remove {
        /// The shop's name, as given to `shop add`.
        name: String,
        /// Also drop the mirrored products.
        #[arg(long)]
        purge: bool,
    },
    /// Drop the mirrored products a `shop remove` without --purge kept.
    Purge {
        /// The removed shop's name, as `shop list --retained` shows it.
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct ShopAddArgs {
    /// The name cobbyd will know the shop by: 1 to 64 characters of a-z,
    /// 0-9, '_' and '-'.
    pub name: String,
    #[arg(long, value_enum, help = PLATFORM_HELP)]
    pub platform: Platform,
    /// The shop's base URL, e.g. https://shop.example.com: the storefront's
    /// address, without /admin, /rest or /api (plain http:// needs
    /// --allow-insecure-http).
    #[arg(long)]
    pub url: String,
    /// Store view to mirror (repeatable; default: "default").
    #[arg(long = "store-code", value_name = "CODE")]
    pub store_codes: Vec<String>,
    /// Magento 2 authentication (Magento 1 always logs in with api_user and
    /// api_key).
    #[arg(long, value_enum, default_value_t = AuthMode::Oauth)]
    pub auth: AuthMode,
    /// TOML file with the credentials, or - for standard input. Magento 2:
    /// consumer_key, consumer_secret, access_token, access_token_secret
    /// (bearer: access_token). Magento 1: api_user, api_key.
    #[arg(long, value_name = "PATH|-")]
    pub credentials_file: PathBuf,
    /// Save even if the connection test fails.
    #[arg(long)]
    pub no_verify: bool,
    /// Accept a plain http:// URL, for a shop that really has no TLS (e.g. a
    /// local test shop): the credentials then cross the network
    /// unencrypted. Status flags such shops.
    #[arg(long)]
    pub allow_insecure_http: bool,
    /// PEM file of extra CA certificates to trust for this shop (a private
    /// CA, or the shop's self-signed certificate), on top of the built-in
    /// roots. The daemon stores the path and reads the file itself (it must
    /// be readable by the daemon's user); verification is never switched off.
    #[arg(long, value_name = "PATH")]
    pub tls_ca_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SyncArgs {
    /// The shop's name, as given to `shop add`.
    pub name: String,
    /// A full reconcile (lists every SKU, removes products gone from the shop).
    #[arg(long)]
    pub full: bool,
    /// Follow progress until the run ends; exit non-zero if it failed.
    #[arg(long)]
    pub wait: bool,
    /// With --full: let this one run delete more than
    /// `sync.max_delete_share` of a mirror (after a run was held because
    /// the shop really lost that many products).
    #[arg(long, requires = "full")]
    pub allow_mass_delete: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// One product per line, exactly as the shop's API returned it.
    Jsonl,
    /// Flattened for spreadsheets (RFC 4180, UTF-8).
    Csv,
}

#[derive(Debug, Args)]
pub struct ProductsArgs {
    /// The shop's name, as given to `shop add` (also a removed shop whose
    /// products were kept: `shop list --retained`).
    pub name: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
    pub format: ExportFormat,
    /// Store view (default: the shop's first).
    #[arg(long = "store-code", value_name = "CODE")]
    pub store_code: Option<String>,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Which Magento the simulated shop runs: magento2 (2.x, REST) or
    /// magento1 (1.x, XML-RPC).
    #[arg(long, value_enum, default_value_t = Platform::Magento2)]
    pub platform: Platform,
    /// Products in the simulated catalog.
    #[arg(long, default_value_t = 5000)]
    pub products: usize,
    /// Do not keep running after the sync: print the result and exit
    /// (implied when stdout is not a terminal).
    #[arg(long)]
    pub non_interactive: bool,
    #[command(flatten)]
    unused: Unused,
}
