//! `tasman topology get | apply | history | rollback | edit`: topology work through the
//! controller's admin API.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;

use super::admin_client::{AdminArgs, AdminClient, Answer, ClientError, Output, block_on, report};
use crate::admin::topology::{
    ApplyRequest, CurrentResponse, HistoryEntry, MAX_HISTORY_LIMIT, RollbackRequest,
};
use crate::controller::ApplyOutcome;

#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  tasman topology get > current.yaml\n  tasman topology get -o json"
)]
pub struct GetArgs {
    #[command(flatten)]
    pub admin: AdminArgs,
    /// A past version instead of the current one.
    #[arg(long)]
    pub version: Option<u64>,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  tasman topology apply apac.yaml --dry-run\n  tasman topology apply apac.yaml --base-version 6 -m \"raise syd-mel latency\"\n\n\
With --base-version N the controller refuses the change (exit 1) unless version N is still the\n\
one in force: a change someone else applied since (the plan you saw did not include it) is not\n\
overwritten. A dry run prints the N its plan was computed against."
)]
pub struct ApplyArgs {
    /// The topology YAML to apply.
    pub file: PathBuf,
    /// Validate and show the impact plan; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Refuse unless version N is still the one in force (nothing applied, exit 1).
    #[arg(long, value_name = "N")]
    pub base_version: Option<u64>,
    /// A note kept in the history.
    #[arg(short, long, default_value = "")]
    pub message: String,
    #[command(flatten)]
    pub admin: AdminArgs,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  tasman topology history --limit 10\n  tasman topology history --limit 10 --before 41   # the next 10, older than 41"
)]
pub struct HistoryArgs {
    /// How many versions, newest first: 1 to 10000 (what one request returns at most).
    #[arg(long, default_value_t = 20, value_parser = parse_limit)]
    pub limit: usize,
    /// Only versions older than this one: the next page, from the oldest version listed.
    #[arg(long, value_name = "VERSION")]
    pub before: Option<u64>,
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// `--limit`: 1 to [`MAX_HISTORY_LIMIT`]. The controller caps a larger one (another count than
/// asked) and refuses 0, so both are refused here, before any request.
fn parse_limit(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_HISTORY_LIMIT).contains(&n) => Ok(n),
        _ => Err(format!(
            "{s:?}: expected a number of versions from 1 to {MAX_HISTORY_LIMIT}"
        )),
    }
}

#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  tasman topology rollback 3\n  tasman topology rollback 3 --base-version 6\n\n\
Creates a new version with the text of VERSION. With --base-version N the controller refuses it\n\
(exit 1) unless version N is still the one in force."
)]
pub struct RollbackArgs {
    pub version: u64,
    #[arg(long)]
    pub dry_run: bool,
    /// Refuse unless version N is still the one in force (nothing rolled back, exit 1).
    #[arg(long, value_name = "N")]
    pub base_version: Option<u64>,
    #[arg(short, long, default_value = "")]
    pub message: String,
    #[command(flatten)]
    pub admin: AdminArgs,
}

#[derive(Debug, Args)]
#[command(after_help = "Example:\n  EDITOR=vim tasman topology edit\n\n\
Opens $EDITOR (else $VISUAL, else vi) on the current topology. When the result is invalid it is\n\
re-opened with the errors as comments on top; when valid, the impact plan is shown and you are\n\
asked before it is applied. Your comments and formatting are kept as written.")]
pub struct EditArgs {
    /// Apply without asking (after showing the plan).
    #[arg(long, short)]
    pub yes: bool,
    #[arg(short, long, default_value = "edited with tasman topology edit")]
    pub message: String,
    #[command(flatten)]
    pub admin: AdminArgs,
}

fn print_json<T: serde::Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("error: {e}"),
    }
}

fn client(a: &AdminArgs) -> Result<AdminClient, ExitCode> {
    AdminClient::new(a).map_err(|e| report(&e, ""))
}

pub fn get(args: GetArgs) -> ExitCode {
    let c = match client(&args.admin) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let res = block_on(async {
        match args.version {
            Some(v) => {
                c.get::<serde_json::Value>(&format!("/v1/topology/versions/{v}"))
                    .await
            }
            None => c.get::<serde_json::Value>("/v1/topology").await,
        }
    });
    match res.and_then(|r| r) {
        Ok(v) => {
            match args.admin.output {
                Output::Json => print_json(&v),
                Output::Text => {
                    print!(
                        "{}",
                        v.get("text").and_then(|t| t.as_str()).unwrap_or_default()
                    );
                    // The version the text is, on stderr (stdout is the file): what an apply
                    // of the edited file names as its base, so that a change someone else made
                    // meanwhile is refused rather than overwritten.
                    if let Some(n) = v.get("version").and_then(|n| n.as_u64()) {
                        if args.version.is_none() {
                            eprintln!(
                                "version {n}: apply your edit with --base-version {n} to refuse it over a newer change"
                            );
                        } else {
                            eprintln!("version {n}");
                        }
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => report(&e, ""),
    }
}

/// The plan as operators read it. `again`: the command that makes the change, for a dry run to
/// say how to make exactly the change it planned (with `--base-version`).
/// Prints an apply's outcome; its warnings point into `source` (the file applied, the version
/// rolled back to, the file edited), as the errors of the same command do.
fn print_outcome(o: &ApplyOutcome, source: &str, again: Option<&str>) {
    for w in &o.warnings {
        eprintln!("{}", w.display(source));
    }
    if o.plan.text.trim().is_empty() {
        println!(
            "plan: {}",
            if o.plan.changed {
                "changes with no effect on routing"
            } else {
                "no changes"
            }
        );
    } else {
        println!("plan:");
        for line in o.plan.text.lines() {
            println!("  {line}");
        }
    }
    match o.version {
        Some(v) => println!("applied: version {v} (was {})", o.previous_version),
        None if o.unchanged => println!(
            "unchanged: version {} has this text already; nothing {}applied",
            o.previous_version,
            if o.dry_run { "would be " } else { "" }
        ),
        None => {
            println!(
                "dry run: nothing applied (current version {})",
                o.previous_version
            );
            if let Some(again) = again {
                println!(
                    "to apply exactly this plan: {again} --base-version {}",
                    o.previous_version
                );
            }
        }
    }
}

/// Exit status of an apply that answered an outcome: 0, or 1 (told on stderr) when its version
/// was committed but could not be distributed: it is the version in force, and routers keep the
/// one before until a change makes it fit.
fn distributed(o: &ApplyOutcome) -> ExitCode {
    let Some(why) = &o.not_distributed else {
        return ExitCode::SUCCESS;
    };
    // A new version, or (unchanged) the version in force, committed by an earlier attempt.
    let v = o.version.unwrap_or(o.previous_version);
    eprintln!(
        "error: version {v} is committed (the version in force on the controller) but was not distributed: {why}; routers keep the version they run until a later change can be"
    );
    ExitCode::from(1)
}

/// `file` (any word) quoted for a POSIX shell when it needs it.
fn shell_word(file: &str) -> String {
    let plain = !file.is_empty()
        && file
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:@%+=,".contains(&b));
    if plain {
        file.to_string()
    } else {
        format!("'{}'", file.replace('\'', "'\\''"))
    }
}

/// The command a dry run of `apply` shows for applying exactly its plan (before the
/// `--base-version`).
fn apply_again(file: &Path, admin: &AdminArgs, message: &str) -> String {
    let file = shell_word(&file.display().to_string());
    again(format!("tasman topology apply {file}"), admin, message)
}

/// As [`apply_again`], for a dry run of `rollback`.
fn rollback_again(version: u64, admin: &AdminArgs, message: &str) -> String {
    again(
        format!("tasman topology rollback {version}"),
        admin,
        message,
    )
}

/// `command` with the controller the dry run asked and its message, each quoted for the shell.
/// The controller always, as resolved (from `--controller`, `TASMAN_CONTROLLER` or the
/// default): pasted in another shell or environment, the command must still go to the
/// controller whose plan it shows, not to whichever the environment there names. The token is
/// never shown (whoever pastes it brings theirs).
fn again(command: String, admin: &AdminArgs, message: &str) -> String {
    let mut s = format!("{command} --controller {}", shell_word(&admin.controller));
    if !message.is_empty() {
        // `--message=`: a message beginning with `-` would be read as a flag after `-m`.
        s.push_str(&format!(" --message={}", shell_word(message)));
    }
    s
}

pub fn apply(args: ApplyArgs) -> ExitCode {
    let file = args.file.display().to_string();
    let text = match super::topology::read_text_or_report(&args.file) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let c = match client(&args.admin) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let req = ApplyRequest {
        text,
        dry_run: args.dry_run,
        message: args.message.clone(),
        author: super::author(),
        base_version: args.base_version,
    };
    match block_on(c.post::<_, Answer<ApplyOutcome>>("/v1/topology", &req)).and_then(|r| r) {
        Ok(o) => {
            let again = apply_again(&args.file, &args.admin, &args.message);
            match args.admin.output {
                Output::Json => print_json(&o),
                Output::Text => print_outcome(&o, &file, Some(&again)),
            }
            distributed(&o)
        }
        Err(e) => report(&e, &file),
    }
}

pub fn history(args: HistoryArgs) -> ExitCode {
    let c = match client(&args.admin) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut path = format!("/v1/topology/history?limit={}", args.limit);
    if let Some(v) = args.before {
        path.push_str(&format!("&before={v}"));
    }
    match block_on(c.get::<Vec<Answer<HistoryEntry>>>(&path)).and_then(|r| r) {
        Ok(rows) => {
            match args.admin.output {
                Output::Json => print_json(&rows),
                Output::Text => {
                    println!(
                        "{:>8}  {:<24}  {:<12}  {:<18}  {:>10}  {:<12}  MESSAGE",
                        "VERSION", "TIME (UTC)", "AUTHOR", "ORIGIN", "BYTES", "SHA256"
                    );
                    for r in rows {
                        let origin = match r.origin {
                            crate::controller::records::Origin::Import { .. } => {
                                "import".to_string()
                            }
                            crate::controller::records::Origin::Apply => "apply".to_string(),
                            crate::controller::records::Origin::Rollback { to } => {
                                format!("rollback to {to}")
                            }
                        };
                        let mark = if r.current { "*" } else { " " };
                        // Enough of the hash to tell texts apart by eye (a rollback shows its
                        // target's); `-o json` has all of it.
                        let sha = r.sha256.get(..12).unwrap_or("-");
                        println!(
                            "{:>7}{mark}  {:<24}  {:<12}  {:<18}  {:>10}  {:<12}  {}",
                            r.version,
                            super::fmt_time(r.time_unix_ms),
                            super::one_line(&r.author),
                            origin,
                            r.bytes,
                            sha,
                            super::one_line(&r.message)
                        );
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => report(&e, ""),
    }
}

pub fn rollback(args: RollbackArgs) -> ExitCode {
    let c = match client(&args.admin) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let req = RollbackRequest {
        version: args.version,
        message: args.message.clone(),
        author: super::author(),
        dry_run: args.dry_run,
        base_version: args.base_version,
    };
    match block_on(c.post::<_, Answer<ApplyOutcome>>("/v1/topology/rollback", &req)).and_then(|r| r)
    {
        Ok(o) => {
            let again = rollback_again(args.version, &args.admin, &args.message);
            match args.admin.output {
                Output::Json => print_json(&o),
                Output::Text => {
                    print_outcome(&o, &format!("version {}", args.version), Some(&again))
                }
            }
            distributed(&o)
        }
        Err(e) => report(&e, &format!("version {}", args.version)),
    }
}

/// Marks the lines `edit` adds on top of the text (removed before validation).
const EDIT_MARK: &str = "# tasman-edit: ";

/// The last line of the header [`with_errors`] writes (after [`EDIT_MARK`]).
const HEADER_END: &str = "(these lines are removed before the topology is checked)";

/// `text` without the header [`with_errors`] wrote on top of it (its [`EDIT_MARK`] lines to
/// [`HEADER_END`]), and how many lines it had; `text` as it is when it has no whole header on
/// top. (Every marked line on top was removed: a text in force whose first lines were marked,
/// as comments of the operator's, lost them at the next `edit`, and an edit that changed
/// nothing was no longer "no changes".)
fn strip_header(text: &str) -> (String, usize) {
    let mut header = 0;
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        if !line.starts_with(EDIT_MARK) {
            break;
        }
        header += 1;
        at += line.len();
        if line.trim_end_matches(['\n', '\r']) == format!("{EDIT_MARK}{HEADER_END}") {
            return (text[at..].to_string(), header);
        }
    }
    (text.to_string(), 0)
}

/// `text` with `error` and `diags` on top, as [`EDIT_MARK`] lines.
fn with_errors(text: &str, error: &str, diags: &[crate::admin::Diag]) -> String {
    let first = format!("{error}; fix and save, or save unchanged to give up");
    let last = HEADER_END;
    // A message may hold line breaks (the loader quotes an unknown key as written): the header
    // ends at the first line without the mark, so each of its lines is a marked line.
    let lines = |m: &str| m.split('\n').count();
    let header_lines =
        lines(&first) + diags.iter().map(|d| lines(&d.message)).sum::<usize>() + lines(last);
    let mut out = String::new();
    let mut marked = |message: &str| {
        for line in message.split('\n') {
            // Other control characters (a carriage return an editor may take for a line
            // break, an escape sequence) are written escaped.
            let line: String = line
                .chars()
                .map(|c| {
                    if c.is_control() && c != '\t' {
                        c.escape_default().to_string()
                    } else {
                        c.to_string()
                    }
                })
                .collect();
            out.push_str(&format!("{EDIT_MARK}{line}\n"));
        }
    };
    marked(&first);
    for d in diags {
        // Line numbers as shown in this file (after these header lines).
        let line = if d.line > 0 { d.line + header_lines } else { 0 };
        marked(&format!(
            "{line}:{}: {}: {}",
            d.column, d.severity, d.message
        ));
    }
    marked(last);
    out.push_str(text);
    out
}

/// The editor to run: `$EDITOR`, else `$VISUAL`, else `vi`; a variable empty (or blank) counts
/// as unset, as elsewhere in the CLI (an empty `EDITOR` ran the file itself, exit 126).
fn editor_from(var: impl Fn(&str) -> Option<String>) -> String {
    ["EDITOR", "VISUAL"]
        .iter()
        .find_map(|v| var(v).filter(|e| !e.trim().is_empty()))
        .unwrap_or_else(|| "vi".into())
}

fn run_editor(path: &Path) -> Result<(), String> {
    let editor = editor_from(|v| std::env::var(v).ok());
    // Through the shell, so EDITOR may carry arguments ("code --wait").
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{editor} \"$1\""))
        .arg("sh")
        .arg(path)
        .status()
        .map_err(|e| format!("cannot run editor {editor:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("editor {editor:?} exited with {status}"))
    }
}

pub fn edit(args: EditArgs) -> ExitCode {
    // It asks in the terminal and prints the plan for a person: a JSON reader would get a
    // prompt and text, or wait on the prompt.
    if args.admin.output == Output::Json {
        eprintln!(
            "error: `tasman topology edit` is interactive and prints no JSON; for a plan in \
             JSON: `tasman topology apply FILE --dry-run -o json`"
        );
        return ExitCode::from(2);
    }
    let c = match client(&args.admin) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match block_on(edit_loop(&c, &args)) {
        Ok(Ok(code)) => code,
        Ok(Err(e)) | Err(e) => report(&e, "topology"),
    }
}

async fn edit_loop(c: &AdminClient, args: &EditArgs) -> Result<ExitCode, ClientError> {
    let cur: CurrentResponse = c.get("/v1/topology").await?;
    let base = cur.record.version;
    let io_err = |e: std::io::Error| ClientError::Protocol(format!("temporary file: {e}"));
    // A directory of a random name, made for this edit and only this user's (0700): a name
    // others can guess (`tasman-edit-<pid>`, which an existing directory satisfied) let another
    // user of a shared host make it first and read, swap or redirect the text this command
    // applies with the operator's token.
    let dir = {
        use std::os::unix::fs::PermissionsExt;
        tempfile::Builder::new()
            .prefix("tasman-edit-")
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir()
            .map_err(io_err)?
    };
    let path = dir.path().join(format!("topology-v{base}.yaml"));
    // Whether the operator was told where the edit is kept.
    let mut told = false;
    // Its text is the version in force (applied, distributed or not, or unchanged).
    let mut in_force = false;
    let result = async {
        std::fs::write(&path, &cur.record.text).map_err(io_err)?;
        let mut last_invalid: Option<String> = None;
        loop {
            if let Err(e) = run_editor(&path) {
                eprintln!("error: {e}");
                return Ok(ExitCode::from(2));
            }
            let edited = std::fs::read_to_string(&path).map_err(io_err)?;
            // A header is removed only once this edit wrote one (a text in force may carry a
            // whole one itself: a file kept after a refused round, applied as it was).
            let (text, header) = match &last_invalid {
                Some(_) => strip_header(&edited),
                None => (edited, 0),
            };
            if text == cur.record.text {
                println!("no changes");
                return Ok(ExitCode::SUCCESS);
            }
            if last_invalid.as_deref() == Some(text.as_str()) {
                eprintln!("error: the topology is still invalid; nothing applied");
                return Ok(ExitCode::from(1));
            }
            let req = ApplyRequest {
                text: text.clone(),
                dry_run: true,
                message: args.message.clone(),
                author: super::author(),
                base_version: Some(base),
            };
            let plan = match c.post::<_, ApplyOutcome>("/v1/topology", &req).await {
                Ok(p) => p,
                // Invalid: its diagnostics shown in the file. A 422 without any (a snapshot over
                // what a router takes, the circuits' doing as much as the text's) is no fault
                // of the text to fix there: said as the controller said it.
                Err(ClientError::Refused {
                    status: 422,
                    error,
                    diagnostics,
                }) if !diagnostics.is_empty() => {
                    eprintln!("the topology is invalid; re-opening the editor");
                    std::fs::write(&path, with_errors(&text, &error, &diagnostics))
                        .map_err(io_err)?;
                    last_invalid = Some(text);
                    continue;
                }
                Err(e) => return Err(e),
            };
            // edit applies against the version it opened already.
            // Its warnings' lines are the text's without the header of errors it may still
            // have on top in the file: counted in the file's lines.
            let mut shown = plan.clone();
            for w in shown.warnings.iter_mut().filter(|w| w.line > 0) {
                w.line += header;
            }
            print_outcome(&shown, &path.display().to_string(), None);
            if !args.yes {
                print!("Apply this change? [y/N] ");
                let _ = std::io::stdout().flush();
                let mut answer = String::new();
                let _ = std::io::stdin().lock().read_line(&mut answer);
                if !matches!(answer.trim(), "y" | "Y" | "yes") {
                    println!("not applied; your edit is kept in {}", path.display());
                    told = true;
                    return Ok(ExitCode::from(1));
                }
            }
            let req = ApplyRequest {
                dry_run: false,
                ..req
            };
            let out: ApplyOutcome = c.post("/v1/topology", &req).await?;
            match out.version {
                Some(v) => println!("applied: version {v} (was {base})"),
                // Another apply made this text the version in force since `base` was read.
                None => println!(
                    "unchanged: version {} has this text already; nothing applied",
                    out.previous_version
                ),
            }
            in_force = true;
            return Ok(distributed(&out));
        }
    }
    .await;
    // Removed once applied (or unchanged), even if not distributed, or when it holds nothing
    // but the text in force (an editor that failed to start: `EDITOR` misspelt); kept on any
    // other end, the operator's work in it (a refusal, a conflict with another apply, a
    // controller away), and said where.
    let untouched = || {
        std::fs::read_to_string(&path)
            .is_ok_and(|t| t == cur.record.text || strip_header(&t).0 == cur.record.text)
    };
    if in_force
        || matches!(&result, Ok(code) if *code == ExitCode::SUCCESS)
        || (!told && untouched())
    {
        let _ = dir.close();
    } else {
        let _ = dir.keep();
        if !told {
            eprintln!("your edit is kept in {}", path.display());
        }
    }
    result
}

#[cfg(test)]
mod tests {
    /// An empty or blank `$EDITOR` counts as unset: `$VISUAL`, else `vi`, is run.
    #[test]
    fn an_empty_editor_variable_counts_as_unset() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |v: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == v)
                    .map(|(_, val)| val.to_string())
            }
        };
        assert_eq!(
            editor_from(env(&[("EDITOR", ""), ("VISUAL", "nano")])),
            "nano"
        );
        assert_eq!(editor_from(env(&[("EDITOR", " "), ("VISUAL", "")])), "vi");
        assert_eq!(
            editor_from(env(&[("EDITOR", "code --wait"), ("VISUAL", "nano")])),
            "code --wait"
        );
        assert_eq!(editor_from(env(&[])), "vi");
    }

    use super::*;

    /// A version committed but not distributed is an error for the operator (exit 1, told
    /// with the version in force and the one routers keep), not a success.
    #[test]
    fn a_committed_version_not_distributed_exits_1() {
        let outcome = |not_distributed: Option<&str>| ApplyOutcome {
            version: Some(8),
            previous_version: 7,
            dry_run: false,
            unchanged: false,
            warnings: Vec::new(),
            plan: Default::default(),
            not_distributed: not_distributed.map(str::to_string),
        };
        assert_eq!(distributed(&outcome(None)), ExitCode::SUCCESS);
        assert_eq!(distributed(&outcome(Some("too large"))), ExitCode::from(1));
    }
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        history: HistoryArgs,
    }

    #[derive(Parser)]
    struct ApplyCli {
        #[command(flatten)]
        apply: ApplyArgs,
    }

    #[derive(Parser)]
    struct RollbackCli {
        #[command(flatten)]
        rollback: RollbackArgs,
    }

    /// The words a POSIX shell makes of `command`.
    fn shell_words(command: &str) -> Vec<String> {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "set -- {command}; for w in \"$@\"; do printf '%s\\0' \"$w\"; done"
            ))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout)
            .unwrap()
            .split_terminator('\0')
            .map(String::from)
            .collect()
    }

    /// The command a dry run of `apply` or `rollback` shows for applying exactly its plan
    /// targets the controller the dry run asked (as resolved: `--controller`, else
    /// `TASMAN_CONTROLLER`, else the default) and keeps its `-m` message, each quoted for the
    /// shell. (Both were dropped: pasted, the command applied to the default controller, or the
    /// one in the environment, with no message.)
    #[test]
    fn a_dry_runs_command_to_apply_its_plan_keeps_the_controller_and_the_message() {
        let message = "-5ms: it's \"$HOME\" `date`; rm -rf x\nsecond line";
        let flag = format!("--message={message}");
        let apply = ApplyCli::try_parse_from([
            "apply",
            "my apac.yaml",
            "--dry-run",
            "--controller",
            "http://10.0.0.1:7401/",
            flag.as_str(),
        ])
        .unwrap()
        .apply;
        let again = apply_again(&apply.file, &apply.admin, &apply.message);
        assert_eq!(
            shell_words(&again),
            [
                "tasman",
                "topology",
                "apply",
                "my apac.yaml",
                "--controller",
                "10.0.0.1:7401",
                flag.as_str()
            ],
            "{again}"
        );
        // Pasted, it means what the dry run meant (`-m -5ms...` would not parse).
        let words = shell_words(&again);
        let pasted = ApplyCli::try_parse_from(&words[2..]).unwrap().apply;
        assert_eq!(pasted.message, message);
        let rollback = RollbackCli::try_parse_from([
            "rollback",
            "3",
            "--dry-run",
            "--controller",
            "[::1]:7401",
            flag.as_str(),
        ])
        .unwrap()
        .rollback;
        let again = rollback_again(rollback.version, &rollback.admin, &rollback.message);
        assert_eq!(
            shell_words(&again),
            [
                "tasman",
                "topology",
                "rollback",
                "3",
                "--controller",
                "[::1]:7401",
                flag.as_str()
            ],
            "{again}"
        );
        // Without -m, none; the controller is there whatever the way it was given.
        let apply = ApplyCli::try_parse_from(["apply", "a.yaml", "--dry-run"])
            .unwrap()
            .apply;
        let again = apply_again(&apply.file, &apply.admin, &apply.message);
        assert_eq!(
            again,
            format!(
                "tasman topology apply a.yaml --controller {}",
                apply.admin.controller
            )
        );
    }

    /// `strip_header` removes every line `with_errors` adds, also for messages of several lines
    /// (the loader quotes an unknown key as written, so a key "a\nb" makes a message of two):
    /// each line of a message is a header line, and a diagnostic's line number points into the
    /// file as shown. (A message's second line was written without the mark: the header ended
    /// there, and the rest of the message was sent with the text as YAML.)
    #[test]
    fn the_edit_header_of_messages_of_several_lines_is_removed_whole() {
        let t = "# tasman-edit: the operator's own, on top, kept\nversion: 1\nnodes: []\n\
                 # tasman-edit: the operator's own, kept\n";
        // A text with no header of edit's is left whole.
        assert_eq!(strip_header(t), (t.to_string(), 0));
        let diags = [
            crate::admin::Diag {
                line: 2,
                column: 1,
                severity: "error".into(),
                message: "unknown field \"a\nb\" in node 1\n(expected one of: id, kind)".into(),
            },
            crate::admin::Diag {
                line: 0,
                column: 0,
                severity: "warning".into(),
                message: "one\r\ntwo\rthree".into(),
            },
        ];
        let shown = with_errors(t, "invalid topology:\n2 errors", &diags);
        let (stripped, header) = strip_header(&shown);
        assert_eq!(stripped, t, "{shown}");
        assert_eq!(header, shown.lines().count() - t.lines().count(), "{shown}");
        assert!(
            shown.contains(&format!(
                "{EDIT_MARK}{}:1: error: unknown field",
                header + 2
            )),
            "{shown}"
        );
        for line in shown.lines().take(header) {
            assert!(line.starts_with(EDIT_MARK), "{line:?} in {shown}");
            assert!(!line.contains('\r'), "{line:?} in {shown}");
        }
    }

    /// `history --limit` is 1 to 10000: 0 listed one version and a larger one was cut to 10000
    /// by the controller, both without a word.
    #[test]
    fn history_limit_is_from_1_to_the_controllers_maximum() {
        let limit =
            |v: &str| Cli::try_parse_from(["history", "--limit", v]).map(|c| c.history.limit);
        assert_eq!(Cli::try_parse_from(["history"]).unwrap().history.limit, 20);
        assert_eq!(limit("1").unwrap(), 1);
        assert_eq!(limit("10000").unwrap(), 10_000);
        for bad in ["0", "10001", " 20000 ", "many"] {
            let err = limit(bad).unwrap_err().to_string();
            assert!(
                err.contains("for '--limit <LIMIT>'")
                    && err.contains("expected a number of versions from 1 to 10000"),
                "{bad}: {err}"
            );
        }
    }
}
