//! `tasman circuit ...`: validate, create, list, show, resize, delete, history and headroom,
//! through the controller's admin API.

use std::net::IpAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use ipnetwork::IpNetwork;
use serde::Serialize;
use topology::circuit::BEnd;
use topology::{Bandwidth, NodeId, Region, ServiceName};

use super::admin_client::{
    AdminArgs, AdminClient, Answer, ClientError, Output as TextOrJson, block_on, report,
};
use crate::circuits::api::{
    CreateRequest, CreateResponse, DeleteRequest, HistoryResponse, MAX_PAGE, ResizeRequest,
};
use crate::circuits::{AEnd, Admission, Archived, Circuit, CircuitSpec, CircuitState};

/// Output of the circuit commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Output {
    #[default]
    #[value(alias = "text")]
    Table,
    Json,
    Yaml,
}

/// Where the controller's admin API is, how to authenticate, and the output format.
#[derive(Debug, Clone, Args)]
pub struct CircuitAdmin {
    /// Admin API address (host:port or http://host:port).
    #[arg(long, env = "TASMAN_CONTROLLER", default_value = "127.0.0.1:7401",
          value_parser = crate::cli::admin_client::parse_controller, value_name = "HOST:PORT")]
    pub controller: String,
    /// Bearer token for the admin API. Wins over --token-file when both are set (on the command
    /// line or in the environment).
    #[arg(long, env = "TASMAN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Read the bearer token from this file (e.g. the controller's `<state>/admin-token`).
    #[arg(long, env = "TASMAN_TOKEN_FILE")]
    pub token_file: Option<std::path::PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Give up on a controller that has not answered a request within this long (connect,
    /// request and the whole answer), e.g. 30s, 2m.
    #[arg(long, env = "TASMAN_REQUEST_TIMEOUT", default_value = "60s",
          value_parser = crate::cli::admin_client::parse_request_timeout, value_name = "DURATION")]
    pub request_timeout: std::time::Duration,
}

impl CircuitAdmin {
    fn client_args(&self) -> AdminArgs {
        AdminArgs {
            controller: self.controller.clone(),
            token: self.token.clone(),
            token_file: self.token_file.clone(),
            output: TextOrJson::Text,
            request_timeout: self.request_timeout,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum CircuitCmd {
    /// Check that a circuit would be admitted (path with room, VIP free) without creating it.
    #[command(
        after_help = "Example:\n  tasman circuit validate --name acme-syd --edge syd-edge-1 --prefix 203.0.113.0/24 \\\n      --service llm-chat --rate 500Mbps\n\nExit 0: it fits (prints the path and VIP it would get); 1: refused, with the reason."
    )]
    Validate(SpecArgs),
    /// Create a circuit: place it, reserve its rate on every link of the path, allocate a VIP.
    #[command(
        after_help = "Example:\n  tasman circuit create --name acme-syd --edge syd-edge-1 --prefix 203.0.113.0/24 \\\n      --service llm-chat --region au-east --rate 500Mbps --idempotency-key order-1234 --wait\n\nA retried create with the same --idempotency-key (and the same request) returns the same\ncircuit, as it is now. --wait blocks until the circuit is active (every router on its path\nacknowledged it); a wait that ends otherwise (failed, deleted meanwhile, --timeout, the\ncontroller unreachable) prints the circuit and exits 4; a replayed key whose circuit was\ndeleted exits 1 at once."
    )]
    Create(CreateArgs),
    /// List circuits.
    #[command(
        after_help = "Example:\n  tasman circuit list -o table\n  tasman circuit list --all -o json   # decommissioned ones too\n  tasman circuit list --archived      # those archived after the retention period"
    )]
    List(ListArgs),
    /// Show one circuit (by id or name).
    #[command(after_help = "Example:\n  tasman circuit show c-000001 -o yaml")]
    Show(IdArgs),
    /// Change a circuit's rate (re-checks admission; make-before-break).
    #[command(
        after_help = "Example:\n  tasman circuit resize c-000001 --rate 1Gbps --wait\n\nThe requested rate changes at once; the assigned rate changes when the routers acknowledge it."
    )]
    Resize(ResizeArgs),
    /// Decommission a circuit: its capacity and VIP are released once its routers acknowledge.
    #[command(after_help = "Example:\n  tasman circuit delete c-000001 --wait")]
    Delete(DeleteArgs),
    /// A circuit's audit trail: who changed what, and when.
    #[command(after_help = "Example:\n  tasman circuit history acme-syd")]
    History(IdArgs),
    /// Per-link capacity, reserved and free bandwidth.
    #[command(after_help = "Example:\n  tasman circuit headroom")]
    Headroom(HeadroomArgs),
}

/// What to ask for.
#[derive(Debug, Clone, Args)]
pub struct SpecArgs {
    /// The circuit's name (letters, digits, '-', '_', '.', ':').
    #[arg(long, value_parser = parse_name)]
    pub name: String,
    /// A-end: the edge node the customer connects to.
    #[arg(long, value_parser = parse_id)]
    pub edge: String,
    /// A-end: the customer's source prefix, e.g. 203.0.113.0/24.
    #[arg(long, value_parser = parse_prefix)]
    pub prefix: IpNetwork,
    /// B-end: the service.
    #[arg(long, value_parser = parse_id)]
    pub service: String,
    /// B-end: only sites in these regions (repeatable, at most 64, each once).
    #[arg(long = "region", value_name = "REGION", value_parser = parse_id)]
    pub regions: Vec<String>,
    /// B-end: only these sites (repeatable, at most 64, each once).
    #[arg(long = "site", value_name = "SITE", value_parser = parse_id)]
    pub sites: Vec<String>,
    /// Rate, e.g. 500Mbps or 1Gbps (each direction).
    // (A leading `-` is taken as the value, so that `-5Mbps` is refused as not positive.)
    #[arg(long, allow_hyphen_values = true)]
    pub rate: Bandwidth,
    /// Address pool for the VIP, of the prefix's family (default: the topology's first pool of
    /// that family with a free address).
    #[arg(long, value_parser = parse_id)]
    pub pool: Option<String>,
    #[command(flatten)]
    pub admin: CircuitAdmin,
}

/// The text of a [`crate::circuits::CircuitError::Invalid`] for a flag's message.
fn invalid(e: crate::circuits::CircuitError) -> String {
    e.to_string()
        .trim_start_matches("invalid circuit: ")
        .to_string()
}

/// `--name`: refused here (exit 2, naming the flag) when the controller would refuse it as
/// malformed.
fn parse_name(s: &str) -> Result<String, String> {
    crate::circuits::check_circuit_name(s).map_err(invalid)?;
    Ok(s.to_string())
}

/// `--idempotency-key`: as `--name`.
fn parse_idempotency_key(s: &str) -> Result<String, String> {
    crate::circuits::check_idempotency_key(s).map_err(invalid)?;
    Ok(s.to_string())
}

/// `--edge`, `--service`, `--pool`, `--region`, `--site`: one id each, as the controller takes
/// them; refused here (exit 2, naming the flag) when malformed. How many regions and sites,
/// and each once, are checked once all are given ([`SpecArgs::check`]).
fn parse_id(s: &str) -> Result<String, String> {
    crate::circuits::check_b_end_id(s)?;
    Ok(s.to_string())
}

fn parse_prefix(s: &str) -> Result<IpNetwork, String> {
    crate::circuits::parse_prefix(s).map_err(invalid)
}

impl SpecArgs {
    /// What the controller would refuse of `--region` and `--site` as a whole (more than
    /// [`crate::circuits::MAX_B_END_ENTRIES`], one given twice), refused before asking (exit 2,
    /// naming the flag, as a malformed value is), by the controller's own check.
    fn check(&self) -> Result<(), CmdError> {
        let list = |flag: &str, ids: &[String]| {
            crate::circuits::check_b_end_list(flag, ids.iter().map(String::as_str))
                .map_err(|e| CmdError::Usage(invalid(e)))
        };
        list("--region", &self.regions)?;
        list("--site", &self.sites)
    }

    fn spec(&self) -> CircuitSpec {
        CircuitSpec {
            name: self.name.clone(),
            a_end: AEnd {
                edge: NodeId::new(&self.edge),
                prefix: self.prefix,
            },
            b_end: BEnd {
                service: ServiceName::new(&self.service),
                regions: self.regions.iter().map(Region::new).collect(),
                sites: self.sites.iter().map(NodeId::new).collect(),
            },
            rate: self.rate,
            pool: self.pool.clone(),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct WaitArgs {
    /// Block until the circuit is active or failed (decommissioned for delete).
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits: seconds (120) or a duration (2m, 90s).
    #[arg(long, value_name = "SECONDS", default_value = "120", requires = "wait",
          value_parser = parse_wait_timeout)]
    pub timeout: Duration,
}

/// `--timeout`: whole seconds, as it always took, or a duration with a unit (`2m`, `90s`).
fn parse_wait_timeout(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let d = match t.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(t).map_err(|e| {
            format!("{s:?}: {e} (expected seconds, e.g. 120, or a duration, e.g. 2m)")
        })?,
    };
    if d.is_zero() {
        return Err(format!("{s:?} must be greater than zero"));
    }
    // A deadline must be representable (`Instant + d` panics past it), after the change is made.
    if d > MAX_WAIT {
        return Err(format!(
            "{s:?} is too long: at most {} seconds ({})",
            MAX_WAIT.as_secs(),
            humantime::format_duration(MAX_WAIT)
        ));
    }
    Ok(d)
}

/// The longest `--timeout` of a `--wait`: a year (`1y`, 365.25 days, as humantime reads it).
const MAX_WAIT: Duration = Duration::from_secs(31_557_600);

#[derive(Debug, Clone, Args)]
pub struct CreateArgs {
    #[command(flatten)]
    pub spec: SpecArgs,
    /// A retried create with the same key returns the same circuit instead of a second one.
    #[arg(long, value_parser = parse_idempotency_key)]
    pub idempotency_key: Option<String>,
    /// Recorded in the audit trail (default $TASMAN_AUTHOR, else $USER). Not a flag of
    /// validate, which records nothing.
    #[arg(long, default_value_t = super::author(), hide_default_value = true)]
    pub author: String,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// Include decommissioned circuits.
    #[arg(long)]
    pub all: bool,
    /// List the circuits archived after the controller's --circuit-retention instead (with
    /// when each was archived).
    #[arg(long, conflicts_with = "all")]
    pub archived: bool,
    #[command(flatten)]
    pub admin: CircuitAdmin,
}

#[derive(Debug, Clone, Args)]
pub struct HeadroomArgs {
    #[command(flatten)]
    pub admin: CircuitAdmin,
}

#[derive(Debug, Clone, Args)]
pub struct IdArgs {
    /// Circuit id (c-000001) or name.
    pub id: String,
    #[command(flatten)]
    pub admin: CircuitAdmin,
}

#[derive(Debug, Clone, Args)]
pub struct ResizeArgs {
    pub id: String,
    /// The new rate, e.g. 1Gbps.
    // (A leading `-` is taken as the value, so that `-5Mbps` is refused as not positive.)
    #[arg(long, allow_hyphen_values = true)]
    pub rate: Bandwidth,
    /// Recorded in the audit trail (default $TASMAN_AUTHOR, else $USER).
    #[arg(long, default_value_t = super::author(), hide_default_value = true)]
    pub author: String,
    #[command(flatten)]
    pub wait: WaitArgs,
    #[command(flatten)]
    pub admin: CircuitAdmin,
}

#[derive(Debug, Clone, Args)]
pub struct DeleteArgs {
    pub id: String,
    /// Recorded in the audit trail (default $TASMAN_AUTHOR, else $USER).
    #[arg(long, default_value_t = super::author(), hide_default_value = true)]
    pub author: String,
    #[command(flatten)]
    pub wait: WaitArgs,
    #[command(flatten)]
    pub admin: CircuitAdmin,
}

#[derive(Debug, thiserror::Error)]
enum CmdError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("circuit {id} failed: {reason}")]
    Failed { id: String, reason: String },
    /// A replayed create's circuit was deleted: it will never become active.
    #[error(
        "circuit {id} was created earlier with idempotency key {key:?} and has since been deleted \
         (it is {state}); it will not become active: a new circuit needs a new idempotency key"
    )]
    KeyDeleted {
        id: String,
        key: String,
        state: CircuitState,
    },
    #[error("circuit {id} was deleted while waiting for it to become active (it is {state})")]
    Deleted { id: String, state: CircuitState },
    #[error("circuit {id} is still {state} after {waited:?}")]
    Timeout {
        id: String,
        state: CircuitState,
        waited: Duration,
    },
    /// A create whose `--wait` ended with the circuit failed or not active yet: the circuit
    /// exists (printed, with its id), so its exit differs from a refused create's (exit 4).
    #[error("{0}")]
    NotActive(Box<CmdError>),
    #[error("cannot print {0}")]
    Print(String),
    /// Flags the controller would refuse as malformed, checked before asking (exit 2).
    #[error("{0}")]
    Usage(String),
    /// An id or name that is one of [`crate::circuits::RESERVED_NAMES`]: no circuit's.
    #[error(
        "no circuit {0:?} (by id or name): {0:?} is reserved, no circuit may take it \
         (/v1/circuits/{0} is a path of the admin API of its own)"
    )]
    Reserved(String),
}

impl CmdError {
    /// The exit code [`run`] returns for it: the client's for a client error (1 refused, 2
    /// unreachable or unusable), else 1.
    fn exit_code(&self) -> u8 {
        match self {
            CmdError::Client(e) => e.exit_code(),
            CmdError::Usage(_) => 2,
            CmdError::NotActive(_) => 4,
            _ => 1,
        }
    }
}

pub fn run(cmd: CircuitCmd) -> ExitCode {
    let admin = match &cmd {
        CircuitCmd::Validate(a) => a.admin.clone(),
        CircuitCmd::Create(a) => a.spec.admin.clone(),
        CircuitCmd::List(a) => a.admin.clone(),
        CircuitCmd::Headroom(a) => a.admin.clone(),
        CircuitCmd::Show(a) | CircuitCmd::History(a) => a.admin.clone(),
        CircuitCmd::Resize(a) => a.admin.clone(),
        CircuitCmd::Delete(a) => a.admin.clone(),
    };
    let client = match AdminClient::new(&admin.client_args()) {
        Ok(c) => c,
        Err(e) => return report(&e, "circuit"),
    };
    let out = admin.output;
    let res = block_on(async move { exec(&client, cmd, out).await });
    match res {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(CmdError::Client(e))) | Err(e) => report(&e, "circuit"),
        Ok(Err(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Refuses a reserved name ([`crate::circuits::RESERVED_NAMES`]) given as a circuit's id or
/// name: no circuit has one (a create refuses it), and asking would reach the admin API's own
/// path instead (`GET /v1/circuits/headroom` answers the headroom table). Refused as an unknown
/// circuit is (exit 1), without asking.
fn not_reserved(id: &str) -> Result<(), CmdError> {
    if crate::circuits::RESERVED_NAMES.contains(&id) {
        return Err(CmdError::Reserved(id.to_string()));
    }
    Ok(())
}

/// `id` escaped for a URL's path or query: ids and names are restricted to URL-safe characters
/// by the controller; anything else cannot match, so escape it rather than build a wrong URL.
fn url_escaped(id: &str) -> String {
    id.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.:".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn id_path(id: &str) -> String {
    format!("/v1/circuits/{}", url_escaped(id))
}

/// Every circuit of a list (`path`: live or archived), read `page_size` at a time, so
/// that no answer nears the client's size limit however many circuits there are. Pages are read
/// one after another, each in its own read: a circuit created or archived meanwhile may be
/// missed or listed twice (as a `kubectl get` with chunks may). A controller from before pages
/// refuses `limit` (400, naming it): it is asked for the whole list in one answer, as before.
async fn all_pages<T: serde::de::DeserializeOwned>(
    client: &AdminClient,
    path: &str,
    page_size: usize,
    id: impl Fn(&T) -> &str,
) -> Result<Vec<Answer<T>>, ClientError> {
    let mut out: Vec<Answer<T>> = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut url = format!("{path}?limit={page_size}");
        if let Some(a) = &after {
            url.push_str(&format!("&after={}", url_escaped(a)));
        }
        let page: Vec<Answer<T>> = match client.get(&url).await {
            Err(ClientError::Refused {
                status: 400, error, ..
            }) if after.is_none() && error.contains("unknown field `limit`") => {
                return client.get(path).await;
            }
            r => r?,
        };
        let full = page.len() >= page_size;
        let last = page.last().map(|c| id(c).to_string());
        out.extend(page);
        match last {
            // Ids must move on, or a wrong answer would be asked for again and again.
            Some(l) if full => {
                if after.as_deref().is_some_and(|a| l.as_str() <= a) {
                    return Err(ClientError::Protocol(format!(
                        "a page of {path} after {after:?} ended at {l:?}: ids do not move on"
                    )));
                }
                after = Some(l);
            }
            _ => return Ok(out),
        }
    }
}

async fn exec(client: &AdminClient, cmd: CircuitCmd, out: Output) -> Result<(), CmdError> {
    match cmd {
        CircuitCmd::Validate(a) => {
            a.check()?;
            let adm: Answer<Admission> = client.post("/v1/circuits/validate", &a.spec()).await?;
            print_value(out, &adm, || admission_text(&a.rate, &adm))
        }
        CircuitCmd::Create(a) => {
            a.spec.check()?;
            let req = CreateRequest {
                spec: a.spec.spec(),
                idempotency_key: a.idempotency_key.clone(),
                author: a.author.clone(),
            };
            let resp: Answer<CreateResponse> = client.post("/v1/circuits", &req).await?;
            if !resp.created {
                let (c, key) = (&resp.circuit, a.idempotency_key.unwrap_or_default());
                if is_removed(c.state) {
                    // It will never become active: waiting would only run into the timeout.
                    if a.wait.wait {
                        return Err(CmdError::KeyDeleted {
                            id: c.id.to_string(),
                            key,
                            state: c.state,
                        });
                    }
                    eprintln!(
                        "circuit {} was created earlier with idempotency key {key:?} and has \
                         since been deleted (it is {}); a new circuit needs a new idempotency key",
                        c.id, c.state
                    );
                } else {
                    eprintln!(
                        "circuit {} already created with idempotency key {key:?}",
                        c.id
                    );
                }
            }
            let c = if a.wait.wait {
                let id = resp.circuit.id.as_str();
                match wait(client, id, resp.circuit.state, &a.wait, false).await {
                    Ok(c) => c,
                    // The circuit exists, whatever ended the wait (it failed, was still
                    // provisioning, was deleted meanwhile, or the controller could not be
                    // asked): printed (as it is now when the controller says so within a few
                    // seconds, else as created) so that a script has its id to delete or look
                    // at, and told apart from a refused create by its exit.
                    Err(e) => {
                        let now = tokio::time::timeout(LAST_LOOK, current(client, id)).await;
                        let c = match now {
                            Ok(Ok(c)) => c,
                            _ => resp.field("circuit")?,
                        };
                        print_circuit(out, &c)?;
                        return Err(CmdError::NotActive(Box::new(e)));
                    }
                }
            } else {
                resp.field("circuit")?
            };
            print_circuit(out, &c)
        }
        CircuitCmd::List(a) if a.archived => {
            let v = all_pages(client, "/v1/archived-circuits", MAX_PAGE, |a: &Archived| {
                a.circuit.id.as_str()
            })
            .await?;
            print_value(out, &v, || archived_table(&v))
        }
        CircuitCmd::List(a) => {
            let mut v = all_pages(client, "/v1/circuits", MAX_PAGE, |c: &Circuit| {
                c.id.as_str()
            })
            .await?;
            if !a.all {
                v.retain(|c| c.state != CircuitState::Decommissioned);
            }
            print_value(out, &v, || table(&v))
        }
        CircuitCmd::Show(a) => {
            not_reserved(&a.id)?;
            let c: Answer<Circuit> = client.get(&id_path(&a.id)).await?;
            print_circuit(out, &c)
        }
        CircuitCmd::Resize(a) => {
            not_reserved(&a.id)?;
            let c: Answer<Circuit> = client
                .post(
                    &format!("{}/resize", id_path(&a.id)),
                    &ResizeRequest {
                        rate: a.rate,
                        author: a.author.clone(),
                    },
                )
                .await?;
            let c = if a.wait.wait {
                wait(client, c.id.as_str(), c.state, &a.wait, false).await?
            } else {
                c
            };
            print_circuit(out, &c)
        }
        CircuitCmd::Delete(a) => {
            not_reserved(&a.id)?;
            let c: Answer<Circuit> = client
                .post(
                    &format!("{}/delete", id_path(&a.id)),
                    &DeleteRequest {
                        author: a.author.clone(),
                    },
                )
                .await?;
            let c = if a.wait.wait {
                wait(client, c.id.as_str(), c.state, &a.wait, true).await?
            } else {
                c
            };
            print_circuit(out, &c)
        }
        CircuitCmd::History(a) => {
            not_reserved(&a.id)?;
            let h: Answer<HistoryResponse> =
                client.get(&format!("{}/history", id_path(&a.id))).await?;
            print_value(out, &h, || {
                let archived = h
                    .archived_unix_ms
                    .map(|t| format!(", archived {}", super::fmt_time(t)))
                    .unwrap_or_default();
                let mut s = format!(
                    "{} ({}), {}{archived}\n",
                    h.circuit.id, h.circuit.name, h.circuit.state
                );
                for e in &h.history {
                    let from = e.from.map(|f| format!("{f} -> ")).unwrap_or_default();
                    s.push_str(&format!(
                        "{}  {:<12} {:<11} {from}{}: {}\n",
                        super::fmt_time(e.time_unix_ms),
                        super::one_line(&e.actor),
                        e.action,
                        e.to,
                        super::one_line(&e.detail)
                    ));
                }
                s
            })
        }
        CircuitCmd::Headroom(a) => {
            let _ = a;
            // Read as plain JSON: a link with nothing reserved has "0bps", which the rate
            // parser (rightly) refuses as a rate.
            let rows: Vec<serde_json::Value> = client.get("/v1/circuits/headroom").await?;
            print_value(out, &rows, || {
                let f = |r: &serde_json::Value, k: &str| match &r[k] {
                    serde_json::Value::String(s) => s.clone(),
                    v => v.to_string(),
                };
                let mut s = format!(
                    "{:<32} {:>10} {:>10} {:>10} {:>8}\n",
                    "LINK", "CAPACITY", "RESERVED", "FREE", "CIRCUITS"
                );
                for r in &rows {
                    s.push_str(&format!(
                        "{:<32} {:>10} {:>10} {:>10} {:>8}\n",
                        f(r, "link"),
                        f(r, "capacity"),
                        f(r, "reserved"),
                        f(r, "free"),
                        f(r, "circuits")
                    ));
                }
                s
            })
        }
    }
}

/// Deleted: decommissioning or decommissioned.
fn is_removed(s: CircuitState) -> bool {
    matches!(
        s,
        CircuitState::Decommissioning | CircuitState::Decommissioned
    )
}

/// Polls the circuit until it settles (or `deadline`): active/failed, or decommissioned. A
/// circuit awaited active that is deleted meanwhile ends the wait with an error.
/// The circuit `id` as it is now, an archived one's last record included: with a short
/// `--circuit-retention`, a circuit can be archived between two looks of a `--wait` (which is
/// then done, or stops as for a deleted one), and its history still has it.
async fn current(client: &AdminClient, id: &str) -> Result<Answer<Circuit>, ClientError> {
    match client.get(&id_path(id)).await {
        Err(ClientError::Refused { status: 410, .. }) => {
            let h: Answer<HistoryResponse> =
                client.get(&format!("{}/history", id_path(id))).await?;
            h.field("circuit")
        }
        other => other,
    }
}

/// Polls circuit `id` (last seen `state`) until it is done or `w.timeout` has passed, which
/// bounds each poll too: a poll could take up to `--request-timeout` past it (60 s by default)
/// and end as a request timeout, exit 2, not as the wait's. A poll that fails for want of the
/// controller (restarting, a connection cut) is made again until the deadline: the change was
/// made, and ending there read as if it had not been; at the deadline its error is the answer.
async fn wait(
    client: &AdminClient,
    id: &str,
    mut state: CircuitState,
    w: &WaitArgs,
    gone: bool,
) -> Result<Answer<Circuit>, CmdError> {
    let deadline = Instant::now() + w.timeout;
    let timed_out = |state| CmdError::Timeout {
        id: id.to_string(),
        state,
        waited: w.timeout,
    };
    // The last poll's failure for want of the controller, the answer if the deadline comes
    // before a poll goes through.
    let mut failed: Option<ClientError> = None;
    // A busy controller (503 past the client's own retries) is looked at again too, and at the
    // deadline the wait ends as timed out (exit 1), not as busy: busy's exit 3 says nothing was
    // changed, and the change was made before the wait began.
    let ended = |e: ClientError, state| match e {
        ClientError::Busy { .. } => timed_out(state),
        e => e.into(),
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let c = match tokio::time::timeout(left, current(client, id)).await {
            Ok(Ok(c)) => c,
            Ok(Err(
                e @ (ClientError::Unreachable { .. }
                | ClientError::Lost { .. }
                | ClientError::TimedOut { .. }
                | ClientError::Busy { .. }),
            )) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(ended(e, state));
                }
                failed = Some(e);
                tokio::time::sleep(POLL.min(left)).await;
                continue;
            }
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => {
                return Err(failed.map_or_else(|| timed_out(state), |e| ended(e, state)));
            }
        };
        failed = None;
        state = c.state;
        let done = if gone {
            c.state == CircuitState::Decommissioned
        } else {
            matches!(c.state, CircuitState::Active | CircuitState::Failed)
        };
        if !gone && is_removed(c.state) {
            return Err(CmdError::Deleted {
                id: c.id.to_string(),
                state: c.state,
            });
        }
        if done {
            if c.state == CircuitState::Failed {
                return Err(CmdError::Failed {
                    id: c.id.to_string(),
                    reason: c.reason.clone().unwrap_or_default(),
                });
            }
            return Ok(c);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out(state));
        }
        tokio::time::sleep(POLL.min(left)).await;
    }
}

/// How long a create whose `--wait` ended unfinished looks at its circuit once more (past
/// `--timeout`) before it prints the circuit as created.
const LAST_LOOK: Duration = Duration::from_secs(2);

/// How often `--wait` looks at the circuit.
const POLL: Duration = Duration::from_millis(100);

fn print_value<T: Serialize>(
    out: Output,
    v: &T,
    text: impl FnOnce() -> String,
) -> Result<(), CmdError> {
    let s = match out {
        Output::Json => serde_json::to_string_pretty(v)
            .map(|s| s + "\n")
            .map_err(|e| CmdError::Print(e.to_string()))?,
        Output::Yaml => serde_saphyr::to_string(v).map_err(|e| CmdError::Print(e.to_string()))?,
        Output::Table => text(),
    };
    print!("{s}");
    Ok(())
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref()
        .map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// What `tasman circuit validate` prints of an admission.
fn admission_text(rate: &impl std::fmt::Display, adm: &Admission) -> String {
    format!(
        "ok: {rate} fits: path {} ({}) to site {}, VIP {} from pool {}\n",
        topology::circuit::arrows(&adm.placement.path),
        adm.placement.latency,
        adm.placement.site,
        vip_at(Some(adm.vip), adm.port),
        adm.pool
    )
}

fn vip(c: &Circuit) -> String {
    vip_at(c.vip, c.port)
}

/// Whether `c`'s VIP, kept in its record for history, went back to its pool (a decommissioned
/// circuit's: another circuit may hold it now).
fn released(c: &Circuit) -> bool {
    c.vip.is_some() && !c.state.holds_capacity()
}

/// The VIP column of `list`: a released one marked, so two circuits that held the same address
/// (one decommissioned) do not read as sharing it.
fn vip_column(c: &Circuit) -> String {
    match released(c) {
        true => format!("({} released)", vip(c)),
        false => vip(c),
    }
}

/// A VIP and its port as an address (an IPv6 one in brackets: `2001:db8::1:8443` is another
/// address, with no port).
fn vip_at(vip: Option<IpAddr>, port: Option<u16>) -> String {
    match (vip, port) {
        (Some(IpAddr::V6(ip)), Some(p)) => format!("[{ip}]:{p}"),
        (Some(ip), Some(p)) => format!("{ip}:{p}"),
        (Some(ip), None) => ip.to_string(),
        (None, _) => "-".to_string(),
    }
}

fn print_circuit(out: Output, c: &Answer<Circuit>) -> Result<(), CmdError> {
    print_value(out, c, || circuit_text(c))
}

/// A circuit as `show` prints it, a field a line; text stored as given (its author, reason and
/// idempotency key) is shown escaped ([`super::one_line`]), as in `history`.
fn circuit_text(c: &Circuit) -> String {
    let path = if c.path.is_empty() {
        "-".to_string()
    } else {
        topology::circuit::arrows(&c.path)
    };
    let mut s = String::new();
    let mut row = |k: &str, v: String| s.push_str(&format!("{k:<16}{v}\n"));
    row("id", c.id.to_string());
    row("name", c.name.clone());
    row("state", c.state.to_string());
    if let Some(r) = &c.reason {
        row("reason", super::one_line(r).into_owned());
    }
    row("a-end", format!("{} from {}", c.a_end.edge, c.a_end.prefix));
    let mut b = c.b_end.service.to_string();
    if !c.b_end.regions.is_empty() {
        b.push_str(&format!(
            " in regions {}",
            c.b_end
                .regions
                .iter()
                .map(|r| r.as_str())
                .collect::<Vec<_>>()
                .join(",")
        ));
    }
    if !c.b_end.sites.is_empty() {
        b.push_str(&format!(
            " at sites {}",
            c.b_end
                .sites
                .iter()
                .map(|r| r.as_str())
                .collect::<Vec<_>>()
                .join(",")
        ));
    }
    row("b-end", b);
    row("requested rate", c.requested_rate.to_string());
    row("assigned rate", opt(&c.assigned_rate));
    row(
        "vip",
        format!(
            "{}{}{}",
            vip(c),
            c.pool
                .as_ref()
                .map(|p| format!(" (pool {p})"))
                .unwrap_or_default(),
            if released(c) {
                " released: the pool hands it out again"
            } else {
                ""
            }
        ),
    );
    row("site", opt(&c.site));
    row(
        "path",
        format!(
            "{path}{}",
            c.latency.map(|l| format!(" ({l})")).unwrap_or_default()
        ),
    );
    if let Some(h) = &c.held {
        row(
            "still holding",
            format!("{} on {}", h.rate, topology::circuit::arrows(&h.path)),
        );
    }
    if let Some(k) = &c.idempotency_key {
        row("idempotency key", super::one_line(k).into_owned());
    }
    row(
        "created",
        format!(
            "{} by {}",
            super::fmt_time(c.created_unix_ms),
            super::one_line(&c.created_by)
        ),
    );
    row(
        "updated",
        format!(
            "{} (revision {})",
            super::fmt_time(c.updated_unix_ms),
            c.revision
        ),
    );
    s
}

fn table(v: &[impl std::ops::Deref<Target = Circuit>]) -> String {
    let mut s = format!(
        "{:<10} {:<20} {:<15} {:<28} {:<14} {:>10} {:>10} {:<22} {}\n",
        "ID", "NAME", "STATE", "A-END", "B-END", "REQUESTED", "ASSIGNED", "VIP", "PATH"
    );
    for c in v {
        s.push_str(&format!(
            "{:<10} {:<20} {:<15} {:<28} {:<14} {:>10} {:>10} {:<22} {}\n",
            c.id.to_string(),
            c.name,
            c.state.to_string(),
            format!("{} {}", c.a_end.edge, c.a_end.prefix),
            c.b_end.service.to_string(),
            c.requested_rate.to_string(),
            opt(&c.assigned_rate),
            vip_column(c),
            c.path
                .iter()
                .map(|n| n.as_str())
                .collect::<Vec<_>>()
                .join(">")
        ));
    }
    s
}

fn archived_table(v: &[impl std::ops::Deref<Target = Archived>]) -> String {
    let mut s = format!(
        "{:<10} {:<20} {:<28} {:<14} {:>10} {:<19} {}\n",
        "ID", "NAME", "A-END", "B-END", "RATE", "DECOMMISSIONED", "ARCHIVED"
    );
    for a in v {
        let c = &a.circuit;
        s.push_str(&format!(
            "{:<10} {:<20} {:<28} {:<14} {:>10} {:<19} {}\n",
            c.id.to_string(),
            c.name,
            format!("{} {}", c.a_end.edge, c.a_end.prefix),
            c.b_end.service.to_string(),
            c.requested_rate.to_string(),
            super::fmt_time(c.decommissioned_unix_ms().unwrap_or(c.updated_unix_ms)),
            super::fmt_time(a.archived_unix_ms),
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use clap::Parser;

    use super::*;
    use crate::admin::{AdminState, bind, serve};
    use crate::circuits::service::{CircuitService, DEFAULT_PROVISION_TIMEOUT};
    use crate::controller::Controller;
    use crate::store::redb::RedbStore;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: CircuitCmd,
    }

    /// Runs `tasman circuit ARGS` against the admin API at `addr` (token `tok`), as [`run`]
    /// does, and returns what it returned.
    async fn circuit(addr: std::net::SocketAddr, args: &[String]) -> Result<(), CmdError> {
        let at = addr.to_string();
        let argv = ["circuit"]
            .into_iter()
            .chain(args.iter().map(String::as_str))
            .chain(["--controller", &at, "--token", "tok", "-o", "json"]);
        let cmd = Cli::try_parse_from(argv).unwrap().cmd;
        exec(&client(addr), cmd, Output::Json).await
    }

    fn client(addr: std::net::SocketAddr) -> AdminClient {
        AdminClient::new(&AdminArgs {
            controller: addr.to_string(),
            token: Some("tok".into()),
            token_file: None,
            output: TextOrJson::Json,
            request_timeout: Duration::from_secs(20),
        })
        .unwrap()
    }

    /// `--timeout` bounds `--wait`: given without it, it is refused instead of ignored; it takes
    /// seconds as before and a duration with a unit (`2m` was refused as "invalid digit found
    /// in string").
    /// `show` prints a circuit's author (stored as given), reason and idempotency key escaped: a
    /// token holder's `--author` with a terminal escape and a line break cleared the operator's
    /// screen and printed a forged field.
    #[test]
    fn show_escapes_text_stored_as_given() {
        let mut c: Circuit = serde_json::from_value(serde_json::json!({
            "id": "c-000001", "name": "acme",
            "a_end": {"edge": "e1", "prefix": "10.1.0.0/24"},
            "b_end": {"service": "chat"},
            "requested_rate": "10Mbps",
            "state": "active",
            "created_by": "x", "created_unix_ms": 0, "updated_unix_ms": 0, "revision": 1
        }))
        .unwrap();
        c.created_by = "eve\u{1b}[2J\nstate           failed".into();
        c.reason = Some("r\u{1b}]0;x\u{7}".into());
        let text = circuit_text(&c);
        assert!(
            !text.contains('\u{1b}') && !text.contains('\u{7}'),
            "{text:?}"
        );
        let created: Vec<_> = text.lines().filter(|l| l.starts_with("created")).collect();
        assert!(
            created.len() == 1 && created[0].contains("eve\\u{1b}[2J\\nstate"),
            "{text}"
        );
        assert_eq!(
            text.lines().filter(|l| l.starts_with("state")).count(),
            1,
            "{text}"
        );
    }

    /// A decommissioned circuit's VIP, kept for history, is shown released (`show` and `list`):
    /// the pool hands it out again, and `list --all` showed it as held beside its new holder.
    #[test]
    fn a_decommissioned_circuits_vip_is_shown_released() {
        let circuit = |state: &str| -> Circuit {
            serde_json::from_value(serde_json::json!({
                "id": "c-000001", "name": "acme",
                "a_end": {"edge": "e1", "prefix": "10.1.0.0/24"},
                "b_end": {"service": "chat"},
                "requested_rate": "10Mbps",
                "state": state, "vip": "100.64.0.1", "port": 8443, "pool": "vips",
                "created_by": "x", "created_unix_ms": 0, "updated_unix_ms": 0, "revision": 1
            }))
            .unwrap()
        };
        let (live, gone) = (circuit("active"), circuit("decommissioned"));
        let vip_line = |c: &Circuit| {
            circuit_text(c)
                .lines()
                .find(|l| l.starts_with("vip"))
                .unwrap()
                .to_string()
        };
        assert!(!vip_line(&live).contains("released"), "{}", vip_line(&live));
        assert!(
            vip_line(&gone).contains("100.64.0.1:8443 (pool vips) released"),
            "{}",
            vip_line(&gone)
        );
        let rows = table(&[&live, &gone]);
        assert!(!rows.lines().nth(1).unwrap().contains("released"), "{rows}");
        assert!(
            rows.lines()
                .nth(2)
                .unwrap()
                .contains("(100.64.0.1:8443 released)"),
            "{rows}"
        );
    }

    #[test]
    fn timeout_needs_wait_and_takes_a_duration() {
        let parse = |extra: &[&str]| {
            let argv = ["circuit", "delete", "acme"].iter().chain(extra).copied();
            Cli::try_parse_from(argv).map(|c| match c.cmd {
                CircuitCmd::Delete(a) => a.wait,
                _ => unreachable!(),
            })
        };
        let w = parse(&[]).unwrap();
        assert_eq!((w.wait, w.timeout), (false, Duration::from_secs(120)));
        for (given, secs) in [("30", 30), ("2m", 120), ("90s", 90), (" 5 ", 5)] {
            let w = parse(&["--wait", "--timeout", given]).unwrap();
            assert_eq!(w.timeout, Duration::from_secs(secs), "{given}");
        }
        let err = parse(&["--timeout", "30"]).unwrap_err();
        assert_eq!(
            err.kind(),
            clap::error::ErrorKind::MissingRequiredArgument,
            "{err}"
        );
        assert!(err.to_string().contains("--wait"), "{err}");
        let err = parse(&["--wait", "--timeout", "soon"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("'soon' for '--timeout <SECONDS>'")
                && err.contains("expected seconds, e.g. 120, or a duration, e.g. 2m"),
            "{err}"
        );
        // A wait of nothing would exit 1 after a change that was made, as --request-timeout
        // refuses 0 too.
        for zero in ["0", "0s"] {
            let err = parse(&["--wait", "--timeout", zero])
                .unwrap_err()
                .to_string();
            assert!(err.contains("must be greater than zero"), "{err}");
        }
        // A deadline past what an `Instant` holds panicked the wait, after the change was
        // made: refused before it is made.
        for huge in ["18446744073709551615", "1000y"] {
            let err = parse(&["--wait", "--timeout", huge])
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("is too long: at most 31557600 seconds"),
                "{err}"
            );
        }
        let w = parse(&["--wait", "--timeout", "1y"]).unwrap();
        assert_eq!(w.timeout, MAX_WAIT);
    }

    /// `--rate` of create and resize: a negative rate is refused as not positive (clap took
    /// `-5Mbps` for an unknown flag `-5`), and a rate in bytes per second is refused naming
    /// the rate in bits (`100MBps` was read as 100 megabits).
    #[test]
    fn rate_refuses_negative_values_and_bytes_per_second() {
        let rate = |args: &[&str]| {
            Cli::try_parse_from(args.iter().copied()).map(|c| match c.cmd {
                CircuitCmd::Create(a) => a.spec.rate,
                CircuitCmd::Resize(a) => a.rate,
                _ => unreachable!(),
            })
        };
        let create = |r: &'static str| {
            vec![
                "circuit",
                "create",
                "--name",
                "n",
                "--edge",
                "e",
                "--prefix",
                "10.0.0.0/24",
                "--service",
                "chat",
                "--rate",
                r,
            ]
        };
        let resize = |r: &'static str| vec!["circuit", "resize", "acme", "--rate", r];
        for argv in [create("100Mbps"), resize("100mbps")] {
            assert_eq!(rate(&argv).unwrap().bps(), 100_000_000);
        }
        for argv in [create("-5Mbps"), resize("-5Mbps")] {
            let err = rate(&argv).unwrap_err().to_string();
            assert!(
                err.contains("invalid value '-5Mbps' for '--rate <RATE>'")
                    && err.contains("must be greater than zero"),
                "{err}"
            );
        }
        for argv in [create("100MBps"), resize("100MBps")] {
            let err = rate(&argv).unwrap_err().to_string();
            assert!(
                err.contains("reads as bytes per second") && err.contains("\"800Mbps\""),
                "{err}"
            );
        }
    }

    /// A wait that ended at its deadline with the circuit still provisioning: exit 1.
    fn timed_out_provisioning(err: &CmdError) {
        assert!(
            matches!(
                err,
                CmdError::Timeout {
                    state: CircuitState::Provisioning,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(err.exit_code(), 1);
    }

    /// A client of `addr` that waits up to 20 s for each answer.
    fn patient_client(addr: std::net::SocketAddr) -> AdminClient {
        AdminClient::new(&AdminArgs {
            controller: addr.to_string(),
            token: Some("tok".into()),
            token_file: None,
            output: TextOrJson::Text,
            request_timeout: Duration::from_secs(20),
        })
        .unwrap()
    }

    /// `--wait --timeout 1s` against a controller that stops answering ends at its own
    /// deadline (exit 1, the state last seen), not at the poll's request timeout 20 s later
    /// (exit 2, as a request timeout).
    #[tokio::test]
    async fn a_wait_ends_at_its_timeout_whatever_a_poll_takes() {
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let held = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((c, _)) = silent.accept().await {
                conns.push(c);
            }
        });
        let w = WaitArgs {
            wait: true,
            timeout: Duration::from_secs(1),
        };
        let started = Instant::now();
        let err = wait(
            &patient_client(addr),
            "c-000001",
            CircuitState::Provisioning,
            &w,
            false,
        )
        .await
        .unwrap_err();
        timed_out_provisioning(&err);
        assert!(started.elapsed() < Duration::from_secs(10), "{err}");
        held.abort();
    }

    /// A poll that fails for want of the controller (a restart cuts its connection) is made
    /// again until the deadline, whose error is then the answer: the first failure ended the
    /// wait, which read as if the change had not been made.
    #[tokio::test]
    async fn a_wait_looks_again_after_a_lost_connection() {
        let cutting = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = cutting.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        let server = tokio::spawn(async move {
            while let Ok((mut c, _)) = cutting.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut buf = [0u8; 4096];
                let _ = tokio::io::AsyncReadExt::read(&mut c, &mut buf).await;
                drop(c);
            }
        });
        let w = WaitArgs {
            wait: true,
            timeout: Duration::from_secs(1),
        };
        let err = wait(
            &patient_client(addr),
            "c-000001",
            CircuitState::Provisioning,
            &w,
            false,
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&err, CmdError::Client(ClientError::Lost { .. })),
            "{err}"
        );
        let n = accepted.load(std::sync::atomic::Ordering::SeqCst);
        assert!(n >= 2, "looked {n} time(s)");
        server.abort();
    }

    /// A controller busy (503) at every poll of a wait: looked at again until the deadline,
    /// which ends the wait as timed out (exit 1). (The first busy answer ended it with busy's
    /// exit 3, "nothing was changed", after a resize or delete that was made.)
    #[tokio::test]
    async fn a_wait_looks_again_while_the_controller_is_busy() {
        let busy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = busy.local_addr().unwrap();
        let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = asked.clone();
        let server = tokio::spawn(async move {
            while let Ok((mut c, _)) = busy.accept().await {
                let count = count.clone();
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = [0u8; 4096];
                    let body = r#"{"error":"busy"}"#;
                    while matches!(c.read(&mut buf).await, Ok(n) if n > 0) {
                        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let answer = format!(
                            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
                             retry-after: 0\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if c.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let w = WaitArgs {
            wait: true,
            timeout: Duration::from_secs(3),
        };
        let client = AdminClient::new(&AdminArgs {
            controller: addr.to_string(),
            token: Some("tok".into()),
            token_file: None,
            output: TextOrJson::Text,
            request_timeout: Duration::from_secs(1),
        })
        .unwrap();
        let err = wait(&client, "c-000001", CircuitState::Provisioning, &w, false)
            .await
            .unwrap_err();
        timed_out_provisioning(&err);
        let n = asked.load(std::sync::atomic::Ordering::SeqCst);
        assert!(n >= 2, "asked {n} time(s)");
        server.abort();
    }

    /// `--edge`, `--service` and `--pool` take one id each, as `--region` and `--site` do:
    /// refused before asking (exit 2, naming the flag). They went to the controller, whose 422
    /// named a JSON field (`a_end.edge`) and exited 1.
    #[test]
    fn edge_service_and_pool_are_refused_naming_the_flag() {
        for (flag, value) in [
            ("--edge", "SYD-EDGE-1"),
            ("--service", "llm_chat"),
            ("--pool", "Pool A"),
        ] {
            let mut argv = vec![
                "circuit",
                "create",
                "--name",
                "n",
                "--edge",
                "e",
                "--prefix",
                "10.0.0.0/24",
                "--service",
                "chat",
                "--rate",
                "1Mbps",
            ];
            match argv.iter().position(|a| *a == flag) {
                Some(at) => argv[at + 1] = value,
                None => argv.extend([flag, value]),
            }
            let err = Cli::try_parse_from(argv).err().expect("parsed");
            assert_eq!(err.exit_code(), 2, "{err}");
            let msg = err.to_string();
            assert!(
                msg.contains(&format!("invalid value '{value}' for '{flag} <"))
                    && msg.contains("is not a valid id"),
                "{msg}"
            );
        }
    }

    /// `validate` refuses `--author` (it records nothing, and took the flag only to ignore it:
    /// its help said "Recorded in the audit trail"); `create` takes it as before.
    #[test]
    fn author_is_a_flag_of_create_not_of_validate() {
        let argv = |cmd: &'static str| {
            [
                "circuit",
                cmd,
                "--name",
                "n",
                "--edge",
                "e",
                "--prefix",
                "10.0.0.0/24",
                "--service",
                "chat",
                "--rate",
                "1Mbps",
                "--author",
                "alice",
            ]
        };
        let err = Cli::try_parse_from(argv("validate")).err().expect("parsed");
        assert_eq!(err.kind(), clap::error::ErrorKind::UnknownArgument, "{err}");
        assert!(err.to_string().contains("--author"), "{err}");
        match Cli::try_parse_from(argv("create")).unwrap().cmd {
            CircuitCmd::Create(a) => assert_eq!(a.author, "alice"),
            _ => unreachable!(),
        }
    }

    /// `create` of `name` from `prefix` at e to chat, with idempotency key `key`, and
    /// `--wait --timeout 10` when `wait`.
    fn create(key: &str, name: &str, prefix: &str, wait: bool) -> Vec<String> {
        let mut v: Vec<String> = [
            "create",
            "--edge",
            "e",
            "--service",
            "chat",
            "--rate",
            "100Mbps",
            "--name",
            name,
            "--prefix",
            prefix,
            "--idempotency-key",
            key,
        ]
        .map(String::from)
        .to_vec();
        if wait {
            v.extend(["--wait", "--timeout", "10"].map(String::from));
        }
        v
    }

    /// `create --wait` stops at once, exit 1 and saying why, when its circuit is deleted: a
    /// replay of a create whose circuit was deleted since (the controller answers with that
    /// circuit, `created: false`), and a circuit deleted while the create waits for it. (Both
    /// waited for the whole --timeout, then said the circuit was "still decommissioning".)
    /// An admin API (token `tok`) on a controller of e, t, s with circuits; no router.
    struct Api {
        _dir: tempfile::TempDir,
        svc: Arc<CircuitService>,
        addr: std::net::SocketAddr,
        server: tokio::task::JoinHandle<()>,
    }

    async fn api() -> Api {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(dir.path()).unwrap());
        let text = crate::circuits::tests::yaml("127.79.0.0/28", true);
        let ctl = Controller::open(store, Some((&text, "t.yaml"))).unwrap();
        let svc = CircuitService::new(ctl.clone(), DEFAULT_PROVISION_TIMEOUT).unwrap();
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, AdminState::new(ctl, "tok", svc.clone())));
        Api {
            _dir: dir,
            svc,
            addr,
            server,
        }
    }

    /// The lists come in pages (`limit`, `after`: in id order, `limit` 0 or not a number
    /// refused 400 naming it); the CLI reads them all, page after page, and asks a controller
    /// from before pages (which refuses `limit`) for the whole list. (Lists were one answer
    /// each, which the CLI could not read past its 64 MiB answer limit.)
    #[tokio::test]
    async fn circuit_lists_come_in_pages_and_the_cli_reads_every_page() {
        let Api {
            svc, addr, server, ..
        } = api().await;
        for i in 1..=5 {
            svc.create(
                crate::circuits::tests::spec(&format!("c{i}"), &format!("10.{i}.0.0/24"), "1Mbps"),
                None,
                "ops".into(),
            )
            .await
            .unwrap();
        }
        let api = client(addr);
        let ids = |v: &[Circuit]| v.iter().map(|c| c.id.to_string()).collect::<Vec<_>>();
        let page: Vec<Circuit> = api.get("/v1/circuits?limit=2").await.unwrap();
        assert_eq!(ids(&page), ["c-000001", "c-000002"]);
        let page: Vec<Circuit> = api
            .get("/v1/circuits?limit=2&after=c-000002")
            .await
            .unwrap();
        assert_eq!(ids(&page), ["c-000003", "c-000004"]);
        let page: Vec<Circuit> = api.get("/v1/circuits?after=c-000003").await.unwrap();
        assert_eq!(ids(&page), ["c-000004", "c-000005"]);
        let page: Vec<Archived> = api.get("/v1/archived-circuits?limit=2").await.unwrap();
        assert_eq!(page, []);
        for (q, says) in [
            ("limit=0", "query parameter `limit` is 0"),
            ("limit=two", "\"two\" is not a number of circuits"),
            ("page=2", "unknown field `page`"),
        ] {
            let err = api
                .get::<Vec<Circuit>>(&format!("/v1/circuits?{q}"))
                .await
                .unwrap_err();
            assert!(
                matches!(&err, ClientError::Refused { status: 400, error, .. } if error.contains(says)),
                "{q}: {err}"
            );
        }
        for size in [1, 2, 5, 6] {
            let all = all_pages(&api, "/v1/circuits", size, |c: &Circuit| c.id.as_str())
                .await
                .unwrap();
            let all: Vec<Circuit> = all.iter().map(|c| (**c).clone()).collect();
            assert_eq!(
                ids(&all),
                ["c-000001", "c-000002", "c-000003", "c-000004", "c-000005"],
                "pages of {size}"
            );
        }
        server.abort();

        // A controller from before pages: its list takes no query parameter.
        let old = axum::Router::new()
            .route(
                "/v1/circuits",
                axum::routing::get(|_: axum::extract::Query<crate::admin::NoQuery>| async {
                    axum::Json(serde_json::json!([{"id": "c-000009"}]))
                }),
            )
            .layer(axum::middleware::from_fn(crate::admin::json_errors));
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let old_addr = listener.local_addr().unwrap();
        let old_server = tokio::spawn(async move {
            axum::serve(listener, old).await.unwrap();
        });
        let all = all_pages(
            &client(old_addr),
            "/v1/circuits",
            2,
            |v: &serde_json::Value| v["id"].as_str().unwrap_or_default(),
        )
        .await
        .unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0]["id"], "c-000009");
        old_server.abort();
    }

    /// A create through the API with an IPv4-mapped prefix is refused (422), naming the IPv4
    /// form, and creates nothing.
    #[tokio::test]
    async fn the_api_refuses_an_ipv4_mapped_prefix() {
        let Api {
            svc, addr, server, ..
        } = api().await;
        let client = AdminClient::new(&AdminArgs {
            controller: addr.to_string(),
            token: Some("tok".into()),
            token_file: None,
            output: TextOrJson::Json,
            request_timeout: Duration::from_secs(20),
        })
        .unwrap();
        let mut spec = crate::circuits::tests::spec("acme", "10.1.0.0/24", "1Mbps");
        spec.a_end.prefix = "::ffff:10.1.0.0/120".parse().unwrap();
        let req = CreateRequest {
            spec,
            idempotency_key: None,
            author: "ops".into(),
        };
        let err = client
            .post::<_, CreateResponse>("/v1/circuits", &req)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ClientError::Refused { status: 422, error, .. }
                if error.contains("::ffff:10.1.0.0/120 is an IPv4-mapped address")
                    && error.ends_with("write 10.1.0.0/24")),
            "{err}"
        );
        assert_eq!(svc.list().unwrap(), []);
        server.abort();
    }

    /// An unknown `pool` in a validate or a create is refused as a malformed request (422, as an
    /// unknown edge or service is), not as a conflict with the fabric's state (409, which an
    /// exhausted pool still is; both exit 1 in the CLI). Nothing is created. (It was a 409.)
    #[tokio::test]
    async fn an_unknown_pool_is_refused_with_422_and_an_exhausted_one_with_409() {
        let Api {
            svc, addr, server, ..
        } = api().await;
        let api = client(addr);
        let mut spec = crate::circuits::tests::spec("acme", "10.1.0.0/24", "1Mbps");
        spec.pool = Some("vipz".into());
        let err = api
            .post::<_, Admission>("/v1/circuits/validate", &spec)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ClientError::Refused { status: 422, error, .. }
                if error.starts_with("unknown pool \"vipz\" (pools: vips")),
            "{err}"
        );
        assert_eq!(err.exit_code(), 1);
        let req = CreateRequest {
            spec,
            idempotency_key: None,
            author: "ops".into(),
        };
        let err = api
            .post::<_, CreateResponse>("/v1/circuits", &req)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ClientError::Refused { status: 422, .. }),
            "{err}"
        );
        assert_eq!(svc.list().unwrap(), []);

        // 127.79.0.0/28 has 14 usable addresses: the 15th circuit finds none.
        for i in 1..=14 {
            let spec =
                crate::circuits::tests::spec(&format!("c{i}"), &format!("10.{i}.0.0/24"), "1Mbps");
            let req = CreateRequest {
                spec,
                idempotency_key: None,
                author: "ops".into(),
            };
            api.post::<_, CreateResponse>("/v1/circuits", &req)
                .await
                .unwrap_or_else(|e| panic!("circuit {i}: {e}"));
        }
        let req = CreateRequest {
            spec: crate::circuits::tests::spec("c15", "10.15.0.0/24", "1Mbps"),
            idempotency_key: None,
            author: "ops".into(),
        };
        let err = api
            .post::<_, CreateResponse>("/v1/circuits", &req)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ClientError::Refused { status: 409, error, .. }
                if error.contains("is exhausted")),
            "{err}"
        );
        assert_eq!(err.exit_code(), 1);
        server.abort();
    }

    /// An archived circuit through the API and the commands: `show` by id is refused with 410
    /// Gone naming when it was archived (exit 1), by name it is unknown (404); `list --archived`
    /// lists it and `list --all` does not; `history` by id still shows it; a replayed create
    /// with `--wait` stops at once, as for a deleted circuit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_archived_circuit_is_gone_by_id_and_listed_with_archived() {
        let Api {
            svc, addr, server, ..
        } = api().await;
        circuit(addr, &create("order-1", "acme", "10.1.0.0/24", false))
            .await
            .unwrap();
        svc.delete("acme".into(), "ops".into()).await.unwrap();
        let ctl = svc.controller().clone();
        let p = ctl.published();
        let _sessions: Vec<_> = ["e", "s"]
            .into_iter()
            .map(|n| {
                let (session, _) = ctl.router_session_start(n);
                assert!(ctl.router_ack(&session, p.version, p.topology_version));
                session
            })
            .collect();
        svc.settle_once().await.unwrap();
        let c = svc.get("acme").unwrap();
        assert_eq!(c.state, CircuitState::Decommissioned);
        let at = c.updated_unix_ms + crate::circuits::DEFAULT_RETENTION.as_millis() as u64;
        assert_eq!(svc.sweep_once(at).await.unwrap(), 1);

        let api = client(addr);
        let err = api
            .get::<Circuit>("/v1/circuits/c-000001")
            .await
            .unwrap_err();
        let when =
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(at));
        assert!(
            matches!(&err, ClientError::Refused { status: 410, error, .. }
                if error.starts_with(&format!(
                    "circuit c-000001 (acme) was decommissioned and then archived at {when}"))),
            "{err}"
        );
        assert_eq!(err.exit_code(), 1);
        let err = api.get::<Circuit>("/v1/circuits/acme").await.unwrap_err();
        assert!(
            matches!(&err, ClientError::Refused { status: 404, .. }),
            "{err}"
        );
        let listed: Vec<Circuit> = api.get("/v1/circuits").await.unwrap();
        assert_eq!(listed, []);
        let archived: Vec<Archived> = api.get("/v1/archived-circuits").await.unwrap();
        assert_eq!(
            archived
                .iter()
                .map(|a| (a.circuit.id.as_str(), a.archived_unix_ms))
                .collect::<Vec<_>>(),
            [("c-000001", at)]
        );
        let h: HistoryResponse = api.get("/v1/circuits/c-000001/history").await.unwrap();
        assert_eq!(
            (
                h.archived_unix_ms,
                h.history.last().map(|e| e.action.as_str())
            ),
            (Some(at), Some("archive"))
        );
        let table = archived_table(&archived.iter().collect::<Vec<_>>());
        assert!(
            table.contains("c-000001") && table.contains(&crate::cli::fmt_time(at)),
            "{table}"
        );
        for args in [
            &["list", "--archived"][..],
            &["history", "c-000001"],
            &["list", "--all"],
        ] {
            let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            circuit(addr, &args)
                .await
                .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        }
        let start = Instant::now();
        let err = circuit(addr, &create("order-1", "acme", "10.1.0.0/24", true))
            .await
            .unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(5), "{err}");
        assert!(
            matches!(&err, CmdError::KeyDeleted { id, state: CircuitState::Decommissioned, .. }
                if id == "c-000001"),
            "{err}"
        );
        assert_eq!(svc.list().unwrap(), [], "the replay created nothing");
        // A `delete --wait` whose circuit is archived before it looks again (a retention of
        // 0 or seconds) is done, not refused; a create's wait stops as for a deleted one.
        let w = WaitArgs {
            wait: true,
            timeout: Duration::from_secs(10),
        };
        let c = wait(&api, "c-000001", CircuitState::Decommissioning, &w, true)
            .await
            .unwrap_or_else(|e| panic!("delete --wait: {e}"));
        assert_eq!(c.state, CircuitState::Decommissioned);
        let err = wait(&api, "c-000001", CircuitState::Decommissioning, &w, false)
            .await
            .unwrap_err();
        assert!(matches!(&err, CmdError::Deleted { .. }), "{err}");
        server.abort();
    }

    /// `validate` prints an IPv6 VIP with its port as `show` and `list` do, in brackets.
    /// (`VIP fd00::1:8080` was printed: another address, with no port.)
    #[test]
    fn validate_prints_an_ipv6_vip_in_brackets() {
        let adm = |vip: &str| Admission {
            placement: topology::circuit::Placement {
                site: NodeId::new("s"),
                path: vec![NodeId::new("e"), NodeId::new("s")],
                latency: "1ms".parse().unwrap(),
            },
            pool: topology::PoolName::new("vips"),
            vip: vip.parse().unwrap(),
            port: Some(8080),
        };
        let text = admission_text(&"100Mbps", &adm("fd00::1"));
        assert!(text.contains("VIP [fd00::1]:8080 from pool vips"), "{text}");
        let text = admission_text(&"100Mbps", &adm("10.0.0.1"));
        assert!(text.contains("VIP 10.0.0.1:8080 from pool vips"), "{text}");
    }

    /// `--region` and `--site` of validate and create are checked before asking, as `--name`
    /// and `--prefix` are, each refused with exit 2 naming the flag: an entry that is not an id
    /// (by clap, as any malformed value), one given twice, more than 64. Nothing is asked of the
    /// controller. (Each went to the controller, which refused it with exit 1 naming the JSON
    /// field `b_end.regions` or `b_end.sites`.)
    #[tokio::test]
    async fn malformed_regions_and_sites_are_refused_before_asking_naming_the_flag() {
        let Api {
            svc, addr, server, ..
        } = api().await;
        let spec = |cmd: &str, extra: &[String]| -> Vec<String> {
            let mut v: Vec<String> = [
                cmd,
                "--name",
                "acme",
                "--edge",
                "e",
                "--prefix",
                "10.1.0.0/24",
                "--service",
                "chat",
                "--rate",
                "1Mbps",
            ]
            .map(String::from)
            .to_vec();
            v.extend(extra.iter().cloned());
            v
        };
        let flags = |flag: &str, values: &[String]| -> Vec<String> {
            values
                .iter()
                .flat_map(|v| [flag.to_string(), v.clone()])
                .collect()
        };
        for cmd in ["validate", "create"] {
            for (flag, bad) in [("--region", "AU-East"), ("--site", "s_1")] {
                let argv = ["circuit".to_string()]
                    .into_iter()
                    .chain(spec(cmd, &flags(flag, &[bad.to_string()])));
                let err = Cli::try_parse_from(argv).err().unwrap_or_else(|| {
                    panic!("{cmd} {flag} {bad}: parsed");
                });
                let msg = err.to_string();
                assert_eq!(err.exit_code(), 2, "{msg}");
                assert!(
                    msg.contains(&format!("invalid value '{bad}' for '{flag} <"))
                        && msg.contains("is not a valid id"),
                    "{msg}"
                );
            }
            for flag in ["--region", "--site"] {
                let many: Vec<String> = (0..=crate::circuits::MAX_B_END_ENTRIES)
                    .map(|i| format!("x{i}"))
                    .collect();
                for (values, want) in [
                    (
                        vec!["r".to_string(), "r".to_string()],
                        format!("{flag} lists \"r\" twice"),
                    ),
                    (many, format!("{flag} lists 65 entries; at most 64")),
                ] {
                    let err = circuit(addr, &spec(cmd, &flags(flag, &values)))
                        .await
                        .unwrap_err();
                    assert_eq!(err.exit_code(), 2, "{cmd} {flag}: {err}");
                    assert!(err.to_string().starts_with(&want), "{cmd} {flag}: {err}");
                }
            }
        }
        assert_eq!(svc.list().unwrap(), []);
        server.abort();
    }

    /// `show`, `history`, `resize` and `delete` of a reserved name (`headroom`, `validate`:
    /// paths of the admin API of their own, which no circuit may take) say there is no such
    /// circuit and why, with exit 1 as for any unknown circuit, and change nothing. (`show
    /// headroom` read the headroom table as a circuit and exited 2, "unexpected answer from the
    /// controller"; `show validate` was refused with 405; the others said only "no circuit".)
    #[tokio::test]
    async fn a_reserved_name_is_no_circuit_with_exit_1() {
        let Api {
            svc, addr, server, ..
        } = api().await;
        circuit(addr, &create("order-1", "acme", "10.1.0.0/24", false))
            .await
            .unwrap();
        for name in crate::circuits::RESERVED_NAMES {
            for args in [
                &["show", name][..],
                &["history", name],
                &["resize", name, "--rate", "1Mbps"],
                &["delete", name],
            ] {
                let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
                let err = circuit(addr, &args).await.unwrap_err();
                assert_eq!(err.exit_code(), 1, "{args:?}: {err}");
                let msg = err.to_string();
                assert!(
                    msg.starts_with(&format!("no circuit {name:?}")) && msg.contains("reserved"),
                    "{args:?}: {msg}"
                );
            }
        }
        let c = svc.get("acme").unwrap();
        assert_eq!(
            (c.revision, c.requested_rate.to_string()),
            (1, "100Mbps".into())
        );
        server.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn create_wait_stops_when_its_circuit_is_deleted() {
        let Api {
            svc, addr, server, ..
        } = api().await;

        // No router acknowledges: a first create without --wait leaves it provisioning.
        circuit(addr, &create("order-1", "acme", "10.1.0.0/24", false))
            .await
            .unwrap();
        svc.delete("acme".into(), "ops".into()).await.unwrap();
        let start = Instant::now();
        let err = circuit(addr, &create("order-1", "acme", "10.1.0.0/24", true))
            .await
            .unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(5), "{err}");
        assert!(
            matches!(
                &err,
                CmdError::KeyDeleted { id, key, state: CircuitState::Decommissioning }
                    if id == "c-000001" && key == "order-1"
            ),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("a new circuit needs a new idempotency key"),
            "{err}"
        );

        // Deleted while the create waits for it.
        let waiting = tokio::spawn(async move {
            circuit(addr, &create("order-2", "acme2", "10.2.0.0/24", true)).await
        });
        let created = Instant::now();
        while svc.get("acme2").is_err() {
            assert!(created.elapsed() < Duration::from_secs(10), "never created");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        svc.delete("acme2".into(), "ops".into()).await.unwrap();
        let start = Instant::now();
        let err = waiting.await.unwrap().unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(5), "{err}");
        // The circuit was created: told apart from a refused create (exit 4, printed).
        assert!(
            matches!(&err, CmdError::NotActive(e)
                if matches!(&**e, CmdError::Deleted { id, .. } if id == "c-000002")),
            "{err}"
        );
        assert_eq!(err.exit_code(), 4);
        server.abort();
    }
}
