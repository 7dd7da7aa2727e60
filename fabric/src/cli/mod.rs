//! The `tasman` command line. Each area has its own module; this one only dispatches.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod admin_client;
pub mod circuit;
pub mod controller;
pub mod demo;
pub mod pki;
pub mod router;
pub mod status;
pub mod topology;
pub mod topology_admin;

#[derive(Parser, Debug)]
#[command(
    name = "tasman",
    version,
    about = "Tasman: a latency-aware interconnect fabric for AI inference traffic",
    after_help = "Examples:\n  \
    tasman demo                                  # the local Asia-Pacific demo fabric\n  \
    tasman topology validate examples/apac.yaml  # line:column diagnostics\n  \
    tasman circuit create --help                 # each command's own examples"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the local Asia-Pacific demo fabric: measure, fail a site over, edit live, drain, exit.
    Demo(demo::DemoArgs),
    /// Work with topology files: validate, route, diff.
    Topology(topology::TopologyArgs),
    /// Run one router (edge, transit or site, from its node's kind in the topology).
    Router(router::RouterArgs),
    /// Make the fabric CA and node certificates.
    Pki(pki::PkiArgs),
    /// Run the controller daemon.
    Controller(controller::ControllerArgs),
    /// Routers, per-service choices and the live RTT matrix, from the controller.
    Status(status::StatusArgs),
    /// Circuits: validate, create, list, show, resize, delete, history, headroom.
    #[command(
        subcommand,
        after_help = "Examples:\n  \
        tasman circuit create --name acme-syd --edge syd-edge-1 --prefix 203.0.113.0/24 --service llm-chat --rate 500Mbps --wait\n  \
        tasman circuit list\n  \
        tasman circuit create --help     # each subcommand's own examples"
    )]
    Circuit(circuit::CircuitCmd),
}

/// Who a change is recorded as: `$TASMAN_AUTHOR`, else `$USER`, else `unknown` (topology and
/// circuit commands alike; `--author` overrides it on the circuit commands).
pub fn author() -> String {
    author_from(|k| std::env::var(k).ok())
}

/// [`author`] from the environment `var` reads: an empty or blank variable counts as unset
/// (`TASMAN_AUTHOR=`, a CI secret not set, recorded every change as `unknown` though `$USER`
/// was there).
fn author_from(var: impl Fn(&str) -> Option<String>) -> String {
    ["TASMAN_AUTHOR", "USER"]
        .into_iter()
        .filter_map(&var)
        .map(|v| v.trim().to_string())
        .find(|v| !v.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// Logs to stderr; `RUST_LOG` filters (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// For the long-running commands (router, controller): raises the open-file limit to its hard
/// limit ([`::router::limits::raise_nofile`]) and logs it.
pub fn raise_nofile() {
    match ::router::limits::raise_nofile() {
        Ok(n) => tracing::info!(open_files = n, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
}

/// Entry point of the binary. Exit codes: 0 success, 1 a domain failure (invalid input,
/// refused request), 2 unreadable input, usage error or controller unreachable, 3 the
/// controller busy to the end (nothing changed).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(
        cli.command,
        Command::Demo(_) | Command::Router(_) | Command::Controller(_)
    ) {
        die_on_closed_stdout();
    }
    match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Topology(args) => topology::run(args),
        Command::Router(args) => router::run(args),
        Command::Pki(args) => pki::run(args),
        Command::Controller(args) => controller::run(args),
        Command::Status(args) => status::run(args),
        Command::Circuit(cmd) => circuit::run(cmd),
    }
}

/// For the one-shot commands: output into a pipe whose reader has gone (`tasman circuit list |
/// head -3`) ends the process quietly, killed by SIGPIPE as any Unix filter is, instead of a
/// panic with a backtrace ("failed printing to stdout: Broken pipe").
///
/// SIGPIPE itself stays ignored (Rust's default): the admin client's TCP writes are vectored
/// (`writev`, which has no MSG_NOSIGNAL), so with the default action a controller closing the
/// connection during a write would kill the command silently instead of failing it with an
/// error. Only the print's own failure, caught by a panic hook, raises SIGPIPE.
fn die_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
            #[cfg(unix)]
            // SAFETY: SIG_DFL is a valid disposition, and raise only sends a signal to this
            // thread; the default action for SIGPIPE ends the whole process.
            unsafe {
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                libc::raise(libc::SIGPIPE);
            }
        }
        default(info)
    }));
}

/// `s` for one cell of a table printed to a terminal: its control characters (a line break
/// that would forge a row, an escape sequence that would rewrite the reader's screen) and
/// bidirectional format characters (a row that reads differently than it is) written escaped,
/// as `\n` or `\u{202e}` ([`::router::control::proto::unsafe_to_show`]). Authors and messages are the operators' own words, stored as
/// given; only their display is escaped.
pub fn one_line(s: &str) -> std::borrow::Cow<'_, str> {
    use ::router::control::proto::unsafe_to_show;
    if !s.chars().any(unsafe_to_show) {
        return std::borrow::Cow::Borrowed(s);
    }
    std::borrow::Cow::Owned(
        s.chars()
            .map(|c| {
                if unsafe_to_show(c) {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

/// `2026-11-29 02:37:23` (UTC) from unix milliseconds.
pub fn fmt_time(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// SIGINT (Ctrl-C), SIGTERM and SIGHUP (the terminal closed), caught from [`Signals::install`]
/// on, each a stop as SIGTERM is (SIGHUP killed the process by the default action: a demo closed
/// with its terminal left its temporary directory, the demo CA's key in it): none kills the process
/// after it (tokio keeps a handler installed once it has one), and one that comes before
/// [`Signals::next`] is awaited is kept for it. The demo, routers and the controller install
/// them first thing in their runtime: a stop asked for while they start is not lost (routers
/// and the controller installed them only once they served, and a SIGTERM before that killed
/// the process by the default action, exit "signal 15", nothing drained nor stored).
///
/// A signal the process was started with ignored (`nohup`: SIGHUP; a shell's background job:
/// SIGINT) stays ignored, as the parent asked: tokio installs a handler whatever the
/// disposition, and the terminal closing then stopped a `nohup tasman router`.
/// Set once [`Signals::next`] resolved.
static SIGNAL_RECEIVED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub(crate) struct Signals {
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    hangup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    /// Installs the handlers at once; must run inside the runtime.
    pub(crate) fn install() -> std::io::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            // Whether `sig` came ignored from the parent.
            fn ignored(sig: libc::c_int) -> bool {
                // SAFETY: `sigaction` with a null new action only reads the current one into
                // `old`, a zeroed `sigaction` owned here.
                unsafe {
                    let mut old: libc::sigaction = std::mem::zeroed();
                    libc::sigaction(sig, std::ptr::null(), &mut old) == 0
                        && old.sa_sigaction == libc::SIG_IGN
                }
            }
            let unless_ignored = |sig: libc::c_int, kind: SignalKind| {
                if ignored(sig) {
                    Ok(None)
                } else {
                    signal(kind).map(Some)
                }
            };
            Ok(Signals {
                interrupt: unless_ignored(libc::SIGINT, SignalKind::interrupt())?,
                terminate: unless_ignored(libc::SIGTERM, SignalKind::terminate())?,
                hangup: unless_ignored(libc::SIGHUP, SignalKind::hangup())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    /// [`Self::install`], or the error said and the exit status to return.
    pub(crate) fn install_or_exit() -> Result<Signals, ExitCode> {
        Signals::install().map_err(|e| {
            eprintln!("error: cannot listen for signals: {e}");
            ExitCode::from(1)
        })
    }

    /// `f`'s output, or `Err` with the exit status of a stop asked for before it finished (a
    /// start cut short: nothing to drain).
    pub(crate) async fn unless<T>(&mut self, f: impl Future<Output = T>) -> Result<T, ExitCode> {
        tokio::select! {
            out = f => Ok(out),
            () = self.next() => {
                tracing::info!("signal received while starting: stopping");
                Err(ExitCode::SUCCESS)
            }
        }
    }

    /// Whether a signal was received ([`Signals::next`] resolved) in this process.
    pub(crate) fn received() -> bool {
        SIGNAL_RECEIVED.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Resolves at the next signal.
    pub(crate) async fn next(&mut self) {
        self.next_signal().await;
        SIGNAL_RECEIVED.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    async fn next_signal(&mut self) {
        #[cfg(unix)]
        {
            async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
            tokio::select! {
                () = recv(&mut self.interrupt) => {}
                () = recv(&mut self.terminate) => {}
                () = recv(&mut self.hangup) => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    /// An empty or blank `TASMAN_AUTHOR` counts as unset, as an empty `TASMAN_TOKEN` does: the
    /// author is `$USER` then. (Every change of a CI job whose secret was not set was recorded
    /// as `unknown`.)
    #[test]
    fn a_blank_author_variable_counts_as_unset() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let author = super::author_from;
        assert_eq!(
            author(env(&[("TASMAN_AUTHOR", ""), ("USER", "alice")])),
            "alice"
        );
        assert_eq!(
            author(env(&[("TASMAN_AUTHOR", " ops "), ("USER", "alice")])),
            "ops"
        );
        assert_eq!(author(env(&[("USER", "  ")])), "unknown");
        assert_eq!(author(env(&[])), "unknown");
    }

    /// A message or author with a line break could forge a row of `topology history`, and an
    /// escape sequence rewrite the reader's screen: a cell shows them escaped.
    #[test]
    fn a_cell_keeps_to_one_line_and_sends_no_escape_sequence() {
        assert_eq!(super::one_line("fix the link"), "fix the link");
        let forged = "fix\n     42*  2026-01-01 00:00:00  alice\u{1b}[2J\r\tend";
        let shown = super::one_line(forged);
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
        assert_eq!(
            shown,
            "fix\\n     42*  2026-01-01 00:00:00  alice\\u{1b}[2J\\r\\tend"
        );
        assert_eq!(super::one_line("a\u{202e}b"), "a\\u{202e}b");
    }
}
