//! Validation: the position-carrying YAML tree ([`crate::yaml`]) to the validated
//! [`Topology`], reporting every problem with the line and column of the field it concerns.
//!
//! The walk never stops at the first problem: a bad field makes its node (or link, service...)
//! incomplete, which is then left out of the model, but its id still counts as known so that
//! one typo does not cascade into a page of "unknown node" errors.

use std::collections::{BinaryHeap, HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use ipnetwork::IpNetwork;

use crate::diag::Diagnostic;
use crate::model::*;
use crate::overlap;
use crate::tree::{Pos, YNode, YValue};
use crate::units::{Bandwidth, Latency, UnitError};
use crate::yaml::{Loaded, MAX_DIAGNOSTICS};

/// Most nodes, links and services in one document (the 10,000-node / 50,000-link benchmark fits
/// with room to spare).
pub const MAX_NODES: usize = 50_000;
pub const MAX_LINKS: usize = 250_000;
pub const MAX_SERVICES: usize = 10_000;

const ROOT_FIELDS: &[&str] = &["version", "nodes", "links", "services", "pools"];
const NODE_FIELDS: &[&str] = &[
    "id",
    "kind",
    "region",
    "country",
    "location",
    "address",
    "state",
    "client_address",
    "transparent_port",
    "serves",
];
const LOCATION_FIELDS: &[&str] = &["lat", "lon"];
const SERVES_FIELDS: &[&str] = &[
    "service",
    "backend",
    "capacity",
    "weight",
    "dial",
    "health_check",
    "health_interval",
    "unhealthy_after",
    "healthy_after",
];
const LINK_FIELDS: &[&str] = &["a", "b", "latency", "capacity", "state"];
const SERVICE_FIELDS: &[&str] = &[
    "name",
    "port",
    "vips",
    "clients",
    "residency",
    "requires_circuit",
    "affinity",
];
const RESIDENCY_FIELDS: &[&str] = &["regions", "countries"];
const POOL_FIELDS: &[&str] = &["name", "prefix"];

/// "FIELD of OWNER", formatted only when a message needs it (the valid path formats nothing).
struct Of<'a>(&'a str, &'a dyn fmt::Display);

impl fmt::Display for Of<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} of {}", self.0, self.1)
    }
}

struct Cx {
    /// [`MAX_DIAGNOSTICS`] kept, so that a document with millions of problems holds a
    /// thousand: errors before warnings, then the first by position ([`Kept`]; the one to drop
    /// for a better one on top).
    diags: BinaryHeap<Kept>,
    /// Every error found, kept or not: the document is invalid if any.
    errors: usize,
    /// Dropped past [`MAX_DIAGNOSTICS`]: errors and warnings.
    dropped: (usize, usize),
    /// A stored text gets the rules added since as warnings ([`Cx::newer`]).
    texts: Texts,
    /// Unknown names given the closest known ones so far ([`Cx::known_list`]).
    hinted: usize,
    /// Distance cells the hints may still compute ([`HINT_CELLS`]).
    hint_cells: u64,
    /// Unknown field names given the closest allowed one so far ([`MAX_HINTED_NAMES`]).
    hinted_fields: usize,
    /// The fewest known names a hint was refused for ([`HINT_CELLS`]): no later one against
    /// as many or more is searched (a smaller list, 12 services after 50,000 ids, still is).
    hints_spent_at: usize,
}

/// How a text is validated: as a new one (every rule), or as one a controller stored under an
/// earlier build's rules ([`crate::load_stored`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Texts {
    New,
    Stored,
}

impl Cx {
    fn new(texts: Texts) -> Self {
        Cx {
            diags: BinaryHeap::new(),
            errors: 0,
            dropped: (0, 0),
            texts,
            hinted: 0,
            hinted_fields: 0,
            hints_spent_at: usize::MAX,
            hint_cells: HINT_CELLS,
        }
    }
    /// A rule added after texts were accepted without it: an error for a new text, a warning
    /// for a stored one, which an upgraded controller must still start on (the operator then
    /// applies a fixed text). Returns whether it was an error, so that the caller drops the
    /// value only then.
    fn newer(&mut self, pos: Pos, msg: impl Into<String>) -> bool {
        if self.texts == Texts::Stored {
            let msg = msg.into();
            self.warn(
                pos,
                format!("{msg} (accepted in this stored version; a new text is refused for it)"),
            );
            false
        } else {
            self.err(pos, msg);
            true
        }
    }

    fn err(&mut self, pos: Pos, msg: impl Into<String>) {
        self.push(Diagnostic::error(pos.line, pos.column, msg));
    }
    fn warn(&mut self, pos: Pos, msg: impl Into<String>) {
        self.push(Diagnostic::warning(pos.line, pos.column, msg));
    }
    /// Keeps `d` if it is among the [`MAX_DIAGNOSTICS`] kept so far ([`Kept`]), and counts the
    /// one dropped.
    fn push(&mut self, d: Diagnostic) {
        self.errors += usize::from(d.is_error());
        self.diags.push(Kept(d));
        if self.diags.len() > MAX_DIAGNOSTICS
            && let Some(Kept(last)) = self.diags.pop()
        {
            if last.is_error() {
                self.dropped.0 += 1;
            } else {
                self.dropped.1 += 1;
            }
        }
    }
    /// The diagnostics kept, sorted, and then one counting those dropped (an error if any was).
    fn finish(self) -> Vec<Diagnostic> {
        let mut diags: Vec<Diagnostic> = self.diags.into_iter().map(|k| k.0).collect();
        diags.sort();
        let (errors, warnings) = self.dropped;
        if errors + warnings > 0 {
            diags.push(Diagnostic::not_shown(errors, warnings));
        }
        diags
    }
}

/// A diagnostic as a capped list ranks it: an error above any warning (a file refused for an
/// error shows where it is, however many warnings come before it), then by position. The
/// greatest is dropped first.
#[derive(Debug, PartialEq, Eq)]
struct Kept(Diagnostic);

impl Ord for Kept {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (!self.0.is_error(), &self.0).cmp(&(!other.0.is_error(), &other.0))
    }
}

impl PartialOrd for Kept {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// The fields of one YAML mapping, after unknown and repeated keys were reported.
struct Fields<'a> {
    pos: Pos,
    what: String,
    entries: Vec<(&'a str, &'a YNode<'a>, &'a YNode<'a>)>,
}

impl<'a> Fields<'a> {
    fn get(&self, name: &str) -> Option<&'a YNode<'a>> {
        self.entries
            .iter()
            .find(|(k, _, _)| *k == name)
            .map(|(_, _, v)| *v)
    }
    fn key_pos(&self, name: &str) -> Option<Pos> {
        self.entries
            .iter()
            .find(|(k, _, _)| *k == name)
            .map(|(_, k, _)| k.pos)
    }
    fn required(&self, cx: &mut Cx, name: &str) -> Option<&'a YNode<'a>> {
        let v = self.get(name);
        if v.is_none() {
            cx.err(
                self.pos,
                format!("missing field \"{name}\" in {}", self.what),
            );
        }
        v
    }
}

fn fields<'a>(
    cx: &mut Cx,
    node: &'a YNode<'a>,
    what: &dyn fmt::Display,
    allowed: &[&str],
) -> Option<Fields<'a>> {
    let YValue::Map(entries) = &node.value else {
        cx.err(
            node.pos,
            format!("{what} must be a mapping, found {}", node.value.kind()),
        );
        return None;
    };
    let mut out = Fields {
        pos: node.pos,
        what: what.to_string(),
        entries: Vec::with_capacity(entries.len()),
    };
    for (k, v) in entries {
        let YValue::Str(key) = &k.value else {
            cx.err(
                k.pos,
                format!(
                    "field names in {what} must be strings, found {}",
                    k.value.kind()
                ),
            );
            continue;
        };
        if key.as_ref() == "<<" {
            // YAML 1.1's merge key: YAML 1.2's core schema, which this reader follows, has none,
            // so it is a field name; no near field name is what was meant.
            cx.err(
                k.pos,
                format!(
                    "merge keys (`<<`) are not supported in {what}: write its fields out (an alias \
                     of a whole value, `*name`, is)"
                ),
            );
            continue;
        }
        if !allowed.contains(&key.as_ref()) {
            // The first [`MAX_HINTED_NAMES`] unknown field names of the document get a "did
            // you mean": each costs its length times every field's (a document of 240,000
            // unknown keys was 10^9 cells, seconds).
            let hint = if cx.hinted_fields < MAX_HINTED_NAMES {
                cx.hinted_fields += 1;
                closest(key, allowed.iter().copied())
            } else {
                None
            }
            .map(|c| format!("; did you mean \"{c}\"?"))
            .unwrap_or_default();
            cx.err(
                k.pos,
                format!(
                    "unknown field {key:?} in {what} (expected one of: {}{hint})",
                    allowed.join(", ")
                ),
            );
            continue;
        }
        if let Some(first) = out.key_pos(key) {
            cx.err(
                k.pos,
                format!(
                    "field {key:?} repeated in {what} (first at line {})",
                    first.line
                ),
            );
            continue;
        }
        out.entries.push((key.as_ref(), k, v));
    }
    Some(out)
}

fn list<'a>(cx: &mut Cx, node: &'a YNode<'a>, what: &dyn fmt::Display) -> &'a [YNode<'a>] {
    match &node.value {
        YValue::Seq(items) => items,
        YValue::Null => &[],
        other => {
            cx.err(
                node.pos,
                format!("{what} must be a list, found {}", other.kind()),
            );
            &[]
        }
    }
}

fn string<'a>(cx: &mut Cx, node: &'a YNode<'a>, what: &dyn fmt::Display) -> Option<&'a str> {
    match &node.value {
        YValue::Str(s) => Some(s),
        other => {
            cx.err(
                node.pos,
                format!("{what} must be a string, found {}", other.kind()),
            );
            None
        }
    }
}

/// A string or number given to a parser (`"12ms"`, `127.0.0.1:7000`); numbers are passed as
/// their text so that `latency: 12` gets the unit parser's "has no unit" message.
fn text(cx: &mut Cx, node: &YNode, what: &dyn fmt::Display) -> Option<String> {
    let t = node.value.scalar_text();
    if t.is_none() {
        cx.err(
            node.pos,
            format!("{what} must be a string, found {}", node.value.kind()),
        );
    }
    t
}

fn ident(cx: &mut Cx, node: &YNode, what: &dyn fmt::Display) -> Option<String> {
    let s = string(cx, node, what)?;
    if is_valid_id(s) {
        Some(s.to_string())
    } else {
        cx.err(
            node.pos,
            format!("{what}: {s:?} is not a valid id (1-63 lowercase letters and digits joined by single hyphens, e.g. syd-edge-1)"),
        );
        None
    }
}

fn integer(
    cx: &mut Cx,
    node: &YNode,
    what: &dyn fmt::Display,
    min: i128,
    max: i128,
) -> Option<i128> {
    match &node.value {
        YValue::Int(i) if (min..=max).contains(i) => Some(*i),
        YValue::Int(i) => {
            cx.err(
                node.pos,
                format!("{what}: {i} is out of range (expected {min} to {max})"),
            );
            None
        }
        // Too long for an i128 as written, or written as a float: out of range, not "not an
        // integer".
        YValue::TooBig(text) => {
            let shown = first_digits(text);
            let more = if text.chars().count() > 24 {
                format!("... ({} characters)", text.chars().count())
            } else {
                String::new()
            };
            cx.err(
                node.pos,
                format!("{what}: {shown}{more} is out of range (expected {min} to {max})"),
            );
            None
        }
        YValue::Float(f) if f.is_finite() && f.fract() == 0.0 && f.abs() >= i128::MAX as f64 => {
            cx.err(
                node.pos,
                format!("{what}: {f:e} is out of range (expected {min} to {max})"),
            );
            None
        }
        other => {
            cx.err(
                node.pos,
                format!("{what} must be an integer, found {}", other.kind()),
            );
            None
        }
    }
}

/// The first 24 characters of a number as written, for a message (one too long for an
/// `i128` may have thousands).
fn first_digits(text: &str) -> String {
    text.chars().take(24).collect()
}

fn port(cx: &mut Cx, node: &YNode, what: &dyn fmt::Display) -> Option<u16> {
    integer(cx, node, what, 1, 65535).and_then(|p| u16::try_from(p).ok())
}

fn number(cx: &mut Cx, node: &YNode, what: &dyn fmt::Display) -> Option<f64> {
    match &node.value {
        YValue::Int(i) => Some(*i as f64),
        // A finite number when read as one (`lat: 1` then 400 digits is infinite: refused below
        // as such).
        YValue::TooBig(text) if text.parse::<f64>().is_ok_and(f64::is_finite) => {
            text.parse::<f64>().ok()
        }
        YValue::TooBig(text) => {
            cx.err(
                node.pos,
                format!("{what}: {}... is out of range", first_digits(text)),
            );
            None
        }
        YValue::Float(f) if f.is_finite() => Some(*f),
        YValue::Float(f) => {
            let found = if f.is_nan() { ".nan" } else { "an infinity" };
            cx.err(
                node.pos,
                format!("{what} must be a finite number, found {found}"),
            );
            None
        }
        other => {
            cx.err(
                node.pos,
                format!("{what} must be a number, found {}", other.kind()),
            );
            None
        }
    }
}

fn boolean(cx: &mut Cx, node: &YNode, what: &dyn fmt::Display) -> Option<bool> {
    match &node.value {
        YValue::Bool(b) => Some(*b),
        other => {
            cx.err(
                node.pos,
                format!("{what} must be true or false, found {}", other.kind()),
            );
            None
        }
    }
}

fn parse_with<T, E: std::fmt::Display>(
    cx: &mut Cx,
    node: &YNode,
    what: &dyn fmt::Display,
    parse: impl FnOnce(&str) -> Result<T, E>,
) -> Option<T> {
    let s = text(cx, node, what)?;
    match parse(&s) {
        Ok(v) => Some(v),
        Err(e) => {
            cx.err(node.pos, format!("{what}: {e}"));
            None
        }
    }
}

/// A serves entry's health check timing (`health_interval`, `unhealthy_after`,
/// `healthy_after`), each bounded ([`HealthPolicy`]) and defaulted when left out.
fn health_policy(cx: &mut Cx, sf: &Fields, sw: &str) -> Option<HealthPolicy> {
    let mut policy = HealthPolicy::default();
    let mut ok = true;
    if let Some(n) = sf.get("health_interval") {
        match parse_with(cx, n, &Of("health_interval", &sw), Latency::from_str) {
            Some(v) if (HealthPolicy::MIN_INTERVAL..=HealthPolicy::MAX_INTERVAL).contains(&v) => {
                policy.interval = v
            }
            Some(v) => {
                cx.err(
                    n.pos,
                    format!(
                        "health_interval of {sw}: {v} is outside {}..={} (how often the \
                         backend is checked)",
                        HealthPolicy::MIN_INTERVAL,
                        HealthPolicy::MAX_INTERVAL
                    ),
                );
                ok = false;
            }
            None => ok = false,
        }
    }
    for (name, slot) in [
        ("unhealthy_after", &mut policy.unhealthy_after),
        ("healthy_after", &mut policy.healthy_after),
    ] {
        if let Some(n) = sf.get(name) {
            match integer(cx, n, &Of(name, &sw), 1, HealthPolicy::MAX_THRESHOLD.into())
                .and_then(|v| u32::try_from(v).ok())
            {
                Some(v) => *slot = v,
                None => ok = false,
            }
        }
    }
    ok.then_some(policy)
}

/// A link capacity. The bytes-per-second spelling (`10GBps`) is refused in a new text; a text
/// stored before that rule keeps the meaning earlier builds gave it, bits per second (a
/// warning), so that a controller upgraded onto it still starts. A rate that reading refuses
/// (`1.5Bps` as `1.5bps`, not a whole number) is an error, as the rate written in bits is.
fn capacity(cx: &mut Cx, node: &YNode, what: &dyn fmt::Display) -> Option<Bandwidth> {
    let s = text(cx, node, what)?;
    match Bandwidth::from_str(&s) {
        Ok(v) => Some(v),
        // A fraction of a bit per second that earlier builds' float tolerance took and
        // rounded (`1.0009bps`): a warning on a stored text, read as they read it.
        Err(e @ UnitError::NotWhole { .. }) => {
            if cx.newer(node.pos, format!("{what}: {e}")) {
                return None;
            }
            match Bandwidth::parse_as_before(&s) {
                Ok(v) => Some(v),
                Err(e) => {
                    cx.err(node.pos, format!("{what}: {e}"));
                    None
                }
            }
        }
        Err(e @ UnitError::BytesPerSecond { .. }) => {
            if cx.newer(node.pos, format!("{what}: {e}")) {
                return None;
            }
            match Bandwidth::parse_as_before(&s.to_ascii_lowercase()) {
                Ok(v) => Some(v),
                Err(e) => {
                    cx.err(
                        node.pos,
                        format!("{what}: read as bits per second, as earlier builds did: {e}"),
                    );
                    None
                }
            }
        }
        Err(e) => {
            cx.err(node.pos, format!("{what}: {e}"));
            None
        }
    }
}

fn state(cx: &mut Cx, node: &YNode, what: &dyn fmt::Display) -> Option<AdminState> {
    match string(cx, node, what)? {
        "up" => Some(AdminState::Up),
        "drain" => Some(AdminState::Drain),
        "down" => Some(AdminState::Down),
        other => {
            cx.err(
                node.pos,
                format!("{what}: unknown state {other:?} (expected one of: up, drain, down)"),
            );
            None
        }
    }
}

fn affinity(cx: &mut Cx, node: &YNode, what: &dyn fmt::Display) -> Option<Affinity> {
    match string(cx, node, what)? {
        "none" => Some(Affinity::None),
        "source_ip" => Some(Affinity::SourceIp),
        other => {
            cx.err(
                node.pos,
                format!("{what}: unknown affinity {other:?} (expected one of: none, source_ip)"),
            );
            None
        }
    }
}

fn socket_addr(
    cx: &mut Cx,
    node: &YNode,
    what: &dyn fmt::Display,
    example: &str,
) -> Option<SocketAddr> {
    let a = parse_with(cx, node, what, |s| {
        SocketAddr::from_str(s).map_err(|_| {
            format!("{s:?} is not an address with a port (expected IP:PORT, e.g. {example})")
        })
    })?;
    if a.port() == 0 {
        cx.err(node.pos, format!("{what}: port 0 is not a usable port"));
        return None;
    }
    Some(a)
}

fn ip_addr(cx: &mut Cx, node: &YNode, what: &dyn fmt::Display) -> Option<IpAddr> {
    parse_with(cx, node, what, |s| {
        IpAddr::from_str(s)
            .map_err(|_| format!("{s:?} is not an IP address (e.g. 127.20.0.1 or ::1)"))
    })
}

/// What keeps `ip` from being one host's address, if anything.
fn not_unicast(ip: IpAddr) -> Option<&'static str> {
    let ip = ip.to_canonical();
    if ip.is_unspecified() {
        Some("the unspecified address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else if matches!(ip, IpAddr::V4(v4) if v4.is_broadcast()) {
        Some("the broadcast address")
    } else {
        None
    }
}

/// The last address of `p` (its broadcast address, for IPv4).
fn last_address(p: IpNetwork) -> IpAddr {
    match p {
        IpNetwork::V4(n) => IpAddr::V4(n.broadcast()),
        IpNetwork::V6(n) => {
            let host = u128::MAX.checked_shr(u32::from(n.prefix())).unwrap_or(0);
            IpAddr::V6((u128::from(n.network()) | host).into())
        }
    }
}

/// A prefix with no host bits set (`10.0.0.0/8`, not `10.0.0.1/8`).
fn prefix(cx: &mut Cx, node: &YNode, what: &dyn fmt::Display) -> Option<IpNetwork> {
    let p = parse_with(cx, node, what, |s| {
        IpNetwork::from_str(s).map_err(|_| {
            format!("{s:?} is not an IP prefix (e.g. 203.0.113.0/24 or 2001:db8::/32)")
        })
    })?;
    let p = host_bits_check(cx, node.pos, what, p)?;
    mapped_check(
        cx,
        node.pos,
        what,
        &p,
        ipv4_mapped(p).map(|v4| v4.to_string()),
        NEVER_MATCHES,
        p,
    )
}

/// Why a mapped address in a field that routers match clients or destinations against is
/// refused ([`mapped_check`]).
const NEVER_MATCHES: &str =
    "which never matches (routers see such clients and destinations as IPv4)";

/// Refuses an IPv4-mapped IPv6 address or prefix (`shown`), suggesting its IPv4 form `v4`, for
/// the reason `why` (e.g. [`NEVER_MATCHES`]). A rule added after texts were stored: only a
/// warning on a stored text.
fn mapped_check<T>(
    cx: &mut Cx,
    pos: Pos,
    what: &dyn fmt::Display,
    shown: &dyn fmt::Display,
    v4: Option<String>,
    why: &str,
    value: T,
) -> Option<T> {
    match v4 {
        Some(v4)
            if cx.newer(
                pos,
                format!("{what}: {shown} is an IPv4-mapped address, {why}; write {v4}"),
            ) =>
        {
            None
        }
        _ => Some(value),
    }
}

fn host_bits_check(
    cx: &mut Cx,
    pos: Pos,
    what: &dyn fmt::Display,
    p: IpNetwork,
) -> Option<IpNetwork> {
    if p.ip() != p.network() {
        cx.err(
            pos,
            format!(
                "{what}: {p} has host bits set (did you mean {}/{}?)",
                p.network(),
                p.prefix()
            ),
        );
        return None;
    }
    Some(p)
}

fn country(cx: &mut Cx, node: &YNode, what: &dyn fmt::Display) -> Option<CountryCode> {
    let s = string(cx, node, what)?;
    match CountryCode::parse(s) {
        Some(c) if c.is_assigned() => Some(c),
        _ => {
            let upper = s.to_ascii_uppercase();
            let hint = match CountryCode::parse(&upper) {
                Some(c) if c.is_assigned() => format!(" (use upper case: {upper})"),
                _ => " (e.g. AU, NZ, SG)".to_string(),
            };
            cx.err(
                node.pos,
                format!("{what}: {s:?} is not an ISO 3166-1 alpha-2 country code{hint}"),
            );
            None
        }
    }
}

/// Levenshtein distance, for "did you mean" hints.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// Longest word a "did you mean" hint is searched for: the longest id, field or region name
/// is 63 characters, so a longer word is close to none, and its distance to each would cost
/// its length times theirs.
const MAX_HINTED_LEN: usize = 64;

/// Unknown names in one document that get the closest known ones: each costs a distance to
/// every known name (10,000 node ids in a large fabric), and a document that renamed its nodes
/// but not its links has 100,000 unknown link ends (that took minutes).
const MAX_HINTED_NAMES: usize = 100;

/// Distance cells (one character of the unknown word against one of a known name) all of a
/// document's hints may compute: 100 hints over 50,000 ids of 63 characters were 2 x 10^10
/// (minutes); 100 over 10,000 ids of 10 characters are under 10^8.
const HINT_CELLS: u64 = 100_000_000;

fn closest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let len = word.chars().count();
    if len > MAX_HINTED_LEN {
        return None;
    }
    let limit = (len / 3).max(2);
    candidates
        .map(|c| (distance(word, c), c))
        .filter(|(d, _)| *d <= limit)
        .min()
        .map(|(_, c)| c)
}

impl Cx {
    /// "(known: a, b, c)" for short lists; the closest few for long ones, for the first
    /// [`MAX_HINTED_NAMES`] unknown names of the document and words of [`MAX_HINTED_LEN`]
    /// characters at most. How many `known` yields is its exact length, not counted, so that
    /// the unknown names past the hinted ones cost nothing per known name (counting walked the
    /// map once per unknown name).
    fn known_list<'a>(
        &mut self,
        word: &str,
        known: impl ExactSizeIterator<Item = &'a str>,
    ) -> String {
        const SHOW: usize = 8;
        let total = known.len();
        if total == 0 {
            return "(no valid ones are defined)".to_string();
        }
        if total <= SHOW {
            let mut all: Vec<&str> = known.collect();
            all.sort_unstable();
            return format!("(known: {})", all.join(", "));
        }
        if word.chars().count() > MAX_HINTED_LEN {
            return format!("({total} known, none that long)");
        }
        if total >= self.hints_spent_at {
            return format!("({total} known; too many to search for the closest)");
        }
        if self.hinted >= MAX_HINTED_NAMES {
            return format!(
                "({total} known; the closest are given for the first {MAX_HINTED_NAMES} unknown \
                 names only)"
            );
        }
        let known: Vec<&str> = known.collect();
        let len = word.chars().count() as u64;
        let cells: u64 = known.iter().map(|k| len * k.len() as u64).sum();
        if cells > self.hint_cells {
            // The budget is spent: later unknown names take the cheap answer above, without
            // walking (and copying) the known names again each.
            self.hints_spent_at = self.hints_spent_at.min(total);
            return format!("({total} known; too many to search for the closest)");
        }
        self.hint_cells -= cells;
        self.hinted += 1;
        let mut ranked: Vec<(usize, &str)> =
            known.into_iter().map(|k| (distance(word, k), k)).collect();
        ranked.sort_unstable();
        let near: Vec<&str> = ranked.iter().take(5).map(|(_, k)| *k).collect();
        format!("(closest of {total} known: {})", near.join(", "))
    }
}

/// `node "syd-edge-1"` when the entry has a valid `key`, else the positional `label` (`node 3`),
/// so that problems found before the id is read still name the entry the way operators know it.
fn named(kind: &str, item: &YNode, key: &str, label: &str) -> String {
    if let YValue::Map(entries) = &item.value {
        for (k, v) in entries {
            if let (YValue::Str(k), YValue::Str(v)) = (&k.value, &v.value)
                && k == key
                && is_valid_id(v)
            {
                return format!("{kind} \"{v}\"");
            }
        }
    }
    label.to_string()
}

/// What the first pass learns about each node entry, even an incomplete one.
struct NodeEntry<'a> {
    id: Option<String>,
    id_pos: Pos,
    kind: Option<NodeKind>,
    fields: Fields<'a>,
    node: Option<Node>,
}

pub(crate) fn validate(root: &YNode, texts: Texts) -> Result<Loaded, Vec<Diagnostic>> {
    let mut cx = Cx::new(texts);
    let topology = walk(&mut cx, root);
    let errors = cx.errors;
    // A value left out of the model is one reported as an error: a text refused with warnings
    // only would give the caller nothing to fix.
    debug_assert!(
        topology.is_some() || errors > 0,
        "a text refused without an error: {:?}",
        cx.diags
    );
    let diags = cx.finish();
    match topology {
        Some(topology) if errors == 0 => Ok(Loaded {
            topology,
            warnings: diags,
        }),
        _ => Err(diags),
    }
}

fn walk(cx: &mut Cx, root: &YNode) -> Option<Topology> {
    let top = fields(cx, root, &"the document", ROOT_FIELDS)?;

    match top.get("version") {
        None => {
            cx.err(
                top.pos,
                "missing field \"version\" in the document (add `version: 1` at the top)",
            );
        }
        Some(v) => match &v.value {
            YValue::Int(1) => {}
            YValue::Int(_) | YValue::TooBig(_) => {
                let n = first_digits(&v.value.scalar_text().unwrap_or_default());
                cx.err(
                    v.pos,
                    format!("unsupported version {n} (this build reads version 1)"),
                );
                // Later versions may mean different things by the same fields: say nothing more.
                return None;
            }
            other => cx.err(
                v.pos,
                format!("version must be the integer 1, found {}", other.kind()),
            ),
        },
    }

    // Nodes, first pass: ids, kinds and the fields every kind has.
    let node_items = match top.required(cx, "nodes") {
        Some(n) => {
            let items = list(cx, n, &"nodes");
            // `nodes:` with nothing after it (a file cut off there) or `nodes: []` read as a
            // valid fabric of nothing, which routes nothing: the field is required for a
            // reason. Pointed at the key, since a null value has no text of its own. A rule
            // added after texts were stored: only a warning on a stored one.
            let empty = match &n.value {
                YValue::Null => Some((
                    top.key_pos("nodes").unwrap_or(n.pos),
                    "empty (nothing follows `nodes:`)",
                )),
                YValue::Seq(s) if s.is_empty() => Some((n.pos, "an empty list")),
                _ => None,
            };
            if let Some((at, how)) = empty {
                cx.newer(
                    at,
                    format!("nodes is {how}: a topology needs at least one node"),
                );
            }
            items
        }
        None => &[],
    };
    if node_items.len() > MAX_NODES {
        cx.err(
            top.key_pos("nodes").unwrap_or(top.pos),
            format!(
                "{} nodes is over the limit of {MAX_NODES}",
                node_items.len()
            ),
        );
        return None;
    }
    let mut entries: Vec<NodeEntry> = Vec::with_capacity(node_items.len());
    let mut ids: HashMap<String, (usize, Pos)> = HashMap::with_capacity(node_items.len());
    // Each QUIC address in its IPv4 form when mapped, with the address as written and its node.
    let mut quic: HashMap<SocketAddr, (SocketAddr, String)> = HashMap::new();
    let mut regions: HashSet<String> = HashSet::new();
    for (i, item) in node_items.iter().enumerate() {
        let label = format!("node {}", i + 1);
        let Some(f) = fields(cx, item, &named("node", item, "id", &label), NODE_FIELDS) else {
            continue;
        };
        let id_node = f.required(cx, "id");
        let id = id_node.and_then(|n| ident(cx, n, &Of("id", &label)));
        let id_pos = id_node.map(|n| n.pos).unwrap_or(f.pos);
        if let Some(id) = &id
            && let Some(why) = reserved_node_id(id)
        {
            // Kept as the id even when refused: the rest of the text is checked as written.
            cx.newer(
                id_pos,
                format!("id of {label}: \"{id}\" is reserved ({why})"),
            );
        }
        let what = match &id {
            Some(id) => format!("node \"{id}\""),
            None => label.clone(),
        };
        let mut f = f;
        f.what = what.clone();
        if let Some(id) = &id {
            if let Some((_, first)) = ids.get(id.as_str()) {
                cx.err(
                    id_pos,
                    format!(
                        "duplicate node id \"{id}\" (first defined at line {})",
                        first.line
                    ),
                );
            } else {
                ids.insert(id.clone(), (i, id_pos));
            }
        }
        let kind = f.required(cx, "kind").and_then(|n| {
            let s = string(cx, n, &Of("kind", &what))?;
            match s {
                "edge" => Some(NodeKind::Edge),
                "transit" => Some(NodeKind::Transit),
                "site" => Some(NodeKind::Site),
                other => {
                    cx.err(n.pos, format!("kind of {what}: unknown kind {other:?} (expected one of: edge, transit, site)"));
                    None
                }
            }
        });
        let region = f
            .required(cx, "region")
            .and_then(|n| ident(cx, n, &Of("region", &what)));
        if let Some(r) = &region {
            regions.insert(r.clone());
        }
        let country = f
            .required(cx, "country")
            .and_then(|n| country(cx, n, &Of("country", &what)));
        let location = f
            .required(cx, "location")
            .and_then(|n| location(cx, n, &what));
        let address = f.required(cx, "address").and_then(|n| {
            let a = socket_addr(cx, n, &Of("address", &what), "127.10.0.1:7000")?;
            // A zone (`[fe80::1%2]:7000`, the scope id) is an interface index of the host that
            // reads it: on a neighbour's host it names another interface, or none. A rule added
            // after texts were stored: only a warning on a stored one.
            // As written: `%0` parses to scope id 0, the same as no zone.
            let zone = n
                .value
                .scalar_text()
                .and_then(|t| t.split_once('%').map(|(_, z)| z.split(']').next().unwrap_or(z).to_string()));
            if let SocketAddr::V6(v6) = a
                && (v6.scope_id() != 0 || zone.is_some())
                && cx.newer(
                    n.pos,
                    format!(
                        "address of {what}: {a} has a zone (%{}), an interface of one host, \
                         which neighbours on other hosts cannot dial (use a global or unique \
                         local address, without a zone)",
                        zone.clone().unwrap_or_else(|| v6.scope_id().to_string())
                    ),
                )
            {
                return None;
            }
            // A link-local address means nothing without its zone (the interface): the router
            // could not bind it, nor its neighbours dial it. A rule added after texts were
            // stored: only a warning on a stored one.
            if let SocketAddr::V6(v6) = a
                && v6.ip().is_unicast_link_local()
                && v6.scope_id() == 0
                && zone.is_none()
                && cx.newer(
                    n.pos,
                    format!(
                        "address of {what}: {a} is link-local: it means something only with a \
                         zone (an interface of one host), which neighbours on other hosts cannot \
                         dial (use a global or unique local address)"
                    ),
                )
            {
                return None;
            }
            // Neighbours dial this address as written: it must be one unicast address.
            if let Some(not) = not_unicast(a.ip())
                && cx.newer(
                    n.pos,
                    format!(
                        "address of {what}: {a} is {not}, which neighbours cannot dial (use the node's own IP)"
                    ),
                )
            {
                return None;
            }
            // `[::ffff:127.10.0.1]:7000` is the endpoint `127.10.0.1:7000` (a dual-stack socket
            // binds and dials the one as the other), so the uniqueness check below compared as
            // written would take both. The IPv4 form is the one to write, as for every other
            // address field. A rule added after texts were stored: only a warning on a stored
            // one, whose mapped address then counts as its IPv4 form below.
            // Only a mapped address has another form: `SocketAddr::new` of the address's own IP
            // would drop a zone, and a zoned address then read as mapped.
            let canonical = match a {
                SocketAddr::V6(v6) => v6
                    .ip()
                    .to_ipv4_mapped()
                    .map_or(a, |v4| SocketAddr::new(v4.into(), a.port())),
                SocketAddr::V4(_) => a,
            };
            mapped_check(
                cx,
                n.pos,
                &Of("address", &what),
                &a,
                (canonical != a).then(|| canonical.to_string()),
                &format!("the same endpoint as {canonical}"),
                (),
            )?;
            if let Some((written, other)) = quic.get(&canonical) {
                let msg = format!(
                    "address of {what}: {a} is already the QUIC address of node \"{other}\""
                );
                // The same endpoint written differently was accepted before the rule above.
                if *written == a {
                    cx.err(n.pos, msg);
                    return None;
                }
                if cx.newer(n.pos, format!("{msg} (written {written})")) {
                    return None;
                }
            } else {
                quic.insert(canonical, (a, id.clone().unwrap_or_else(|| label.clone())));
            }
            Some(a)
        });
        let state = f.get("state").map(|n| state(cx, n, &Of("state", &what)));
        let client_address = f.get("client_address").map(|n| {
            let ip = ip_addr(cx, n, &Of("client_address", &what))?;
            let v4 = match ip {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map(|a| a.to_string()),
                IpAddr::V4(_) => None,
            };
            // Reported but kept: its IPv4 form still counts in the checks below (a pool
            // holding it).
            let _ = mapped_check(
                cx,
                n.pos,
                &Of("client_address", &what),
                &ip,
                v4,
                NEVER_MATCHES,
                (),
            );
            // A wildcard is a listen address (every address of the edge's host); a multicast
            // or broadcast address cannot take TCP connections at all.
            if let Some(not) = not_unicast(ip).filter(|_| !ip.to_canonical().is_unspecified())
                && cx.newer(
                    n.pos,
                    format!("client_address of {what}: {ip} is {not}, which TCP clients cannot connect to"),
                )
            {
                return None;
            }
            // A link-local address binds only with its zone (the interface), which a
            // client_address cannot carry: the edge could bind no listener on it. A rule added
            // after texts were stored: only a warning on a stored one.
            if let IpAddr::V6(v6) = ip
                && v6.is_unicast_link_local()
                && cx.newer(
                    n.pos,
                    format!(
                        "client_address of {what}: {ip} is link-local: it can be bound only with a zone (an \
                         interface), which a client_address has none of (use a global or unique \
                         local address)"
                    ),
                )
            {
                return None;
            }
            Some(ip)
        });
        let transparent_port = f
            .get("transparent_port")
            .map(|n| port(cx, n, &Of("transparent_port", &what)));
        if let Some(k) = kind {
            for (field, only) in [
                ("client_address", NodeKind::Edge),
                ("transparent_port", NodeKind::Edge),
                ("serves", NodeKind::Site),
            ] {
                if k != only
                    && let Some(p) = f.key_pos(field)
                {
                    cx.err(
                        p,
                        format!(
                            "{field} is only allowed on {only} nodes, and {what} is {} {k} node",
                            if k == NodeKind::Edge { "an" } else { "a" }
                        ),
                    );
                }
            }
        }
        let node = match (
            id.clone(),
            kind,
            region,
            country,
            location,
            address,
            state,
            client_address,
            transparent_port,
        ) {
            (
                Some(id),
                Some(kind),
                Some(region),
                Some(country),
                Some(location),
                Some(address),
                state,
                ca,
                tp,
            ) if state.is_none_or(|s| s.is_some())
                && ca.is_none_or(|c| c.is_some())
                && tp.is_none_or(|t| t.is_some()) =>
            {
                Some(Node {
                    id: NodeId::new(id),
                    kind,
                    region: Region::new(region),
                    country,
                    location,
                    address,
                    state: state.flatten().unwrap_or_default(),
                    client_address: client_address.flatten(),
                    transparent_port: transparent_port.flatten(),
                    serves: Vec::new(),
                })
            }
            _ => None,
        };
        entries.push(NodeEntry {
            id,
            id_pos,
            kind,
            fields: f,
            node,
        });
    }

    // Services.
    let service_items = top
        .get("services")
        .map(|n| list(cx, n, &"services"))
        .unwrap_or(&[]);
    if service_items.len() > MAX_SERVICES {
        cx.err(
            top.key_pos("services").unwrap_or(top.pos),
            format!(
                "{} services is over the limit of {MAX_SERVICES}",
                service_items.len()
            ),
        );
        return None;
    }
    // Each service kept, with the positions of its name and of its `residency` key (the name's
    // when it has none), where problems with it are reported.
    let mut services: Vec<(Service, Pos, Pos)> = Vec::new();
    // Services reserved to circuits, with their flag's position (a circuit needs a pool).
    let mut circuit_only: Vec<(String, Pos)> = Vec::new();
    let mut service_names: HashMap<String, Pos> = HashMap::new();
    let mut ports: HashMap<u16, String> = HashMap::new();
    // Every VIP that parses, with its position and its service (the index into `owners`); their
    // overlaps are checked once all are known.
    let mut parsed_vips: Vec<(Vip, Pos, usize)> = Vec::new();
    // Per service entry that has VIPs: how messages name it (`service "x"`), its name (or
    // `service 3`) and the entry's index.
    let mut owners: Vec<(String, String, usize)> = Vec::new();
    // The entry index of each service in `services`.
    let mut service_entry: Vec<usize> = Vec::new();
    for (i, item) in service_items.iter().enumerate() {
        let label = format!("service {}", i + 1);
        let Some(f) = fields(
            cx,
            item,
            &named("service", item, "name", &label),
            SERVICE_FIELDS,
        ) else {
            continue;
        };
        let name_node = f.required(cx, "name");
        let name = name_node.and_then(|n| ident(cx, n, &Of("name", &label)));
        let name_pos = name_node.map(|n| n.pos).unwrap_or(f.pos);
        let what = match &name {
            Some(n) => format!("service \"{n}\""),
            None => label.clone(),
        };
        let mut ok = name.is_some();
        if let Some(n) = &name {
            if let Some(first) = service_names.get(n.as_str()) {
                cx.err(
                    name_pos,
                    format!(
                        "duplicate service name \"{n}\" (first defined at line {})",
                        first.line
                    ),
                );
                ok = false;
            } else {
                service_names.insert(n.clone(), name_pos);
            }
        }
        let port = match f.get("port") {
            None => None,
            Some(n) => match port(cx, n, &Of("port", &what)) {
                Some(p) => {
                    if let Some(other) = ports.get(&p) {
                        cx.err(
                            n.pos,
                            format!(
                                "port of {what}: {p} is already the port of service \"{other}\""
                            ),
                        );
                        ok = false;
                    } else {
                        ports.insert(p, name.clone().unwrap_or_else(|| label.clone()));
                    }
                    Some(p)
                }
                None => {
                    ok = false;
                    None
                }
            },
        };
        let mut service_vips = Vec::new();
        if let Some(n) = f.get("vips") {
            let vips = list(cx, n, &Of("vips", &what));
            if !vips.is_empty() {
                owners.push((
                    what.clone(),
                    name.clone().unwrap_or_else(|| label.clone()),
                    i,
                ));
            }
            for v in vips {
                let vw = format!("VIP of {what}");
                match parse_with(cx, v, &vw, Vip::from_str).and_then(|vip| {
                    host_bits_check(cx, v.pos, &vw, vip.prefix)?;
                    let v4 = ipv4_mapped(vip.prefix).map(|p| {
                        Vip {
                            prefix: IpNetwork::V4(p),
                            port: vip.port,
                        }
                        .to_string()
                    });
                    mapped_check(cx, v.pos, &vw, &vip, v4, NEVER_MATCHES, vip)
                }) {
                    Some(vip) => {
                        parsed_vips.push((vip, v.pos, owners.len() - 1));
                        service_vips.push(vip);
                    }
                    None => ok = false,
                }
            }
        }
        let mut clients = Vec::new();
        if let Some(n) = f.get("clients") {
            // Edges take an empty list as "any client": `clients: []` (a list emptied by
            // mistake) or a `clients:` with nothing after it opened the service to everyone,
            // silently. Leaving the field out says that. Pointed at the key for a null value, as
            // for `nodes`. A rule added after texts were stored: only a warning on a stored one,
            // whose service then still allows any client.
            let empty = match &n.value {
                YValue::Null => Some((
                    f.key_pos("clients").unwrap_or(n.pos),
                    "empty (nothing follows `clients:`)",
                )),
                YValue::Seq(s) if s.is_empty() => Some((n.pos, "an empty list")),
                _ => None,
            };
            if let Some((at, how)) = empty
                && cx.newer(
                    at,
                    format!(
                        "clients of {what} is {how}: omit the field to allow any client, or list \
                         the client prefixes allowed"
                    ),
                )
            {
                ok = false;
            }
            for c in list(cx, n, &Of("clients", &what)) {
                match prefix(cx, c, &Of("client prefix", &what)) {
                    Some(p) => clients.push(p),
                    None => ok = false,
                }
            }
        }
        let mut residency = Residency::default();
        if let Some(n) = f.get("residency") {
            match fields(cx, n, &Of("residency", &what), RESIDENCY_FIELDS) {
                Some(r) => {
                    // A residency that restricts nothing (`residency: {}`, its lists empty, or a
                    // list with nothing after its key) lifted the rule silently, the service then
                    // served anywhere. Refused as `clients` is; an empty list beside a list that
                    // restricts stays (the writer spells a residency by regions alone so). A
                    // rule added after texts were stored: only a warning on a stored one.
                    let mut lifted = None;
                    for key in ["regions", "countries"] {
                        if let Some(YValue::Null) = r.get(key).map(|n| &n.value) {
                            lifted.get_or_insert((
                                r.key_pos(key).unwrap_or(n.pos),
                                format!("`{key}` is empty (nothing follows `{key}:`)"),
                            ));
                        }
                    }
                    let restricts = |key: &str| {
                        r.get(key).is_some_and(|n| match &n.value {
                            YValue::Null => false,
                            YValue::Seq(s) => !s.is_empty(),
                            // Not a list: refused as such below.
                            _ => true,
                        })
                    };
                    // A mapping with other keys (a misspelt `country`, not among the fields
                    // taken) is refused for them.
                    let only_known =
                        matches!(&n.value, YValue::Map(m) if m.len() == r.entries.len());
                    if lifted.is_none()
                        && only_known
                        && !restricts("regions")
                        && !restricts("countries")
                    {
                        lifted = Some((n.pos, "it restricts nothing".to_string()));
                    }
                    if let Some((at, how)) = lifted
                        && cx.newer(
                            at,
                            format!(
                                "residency of {what}: {how}: omit the field to let any site \
                                 serve it, or list the regions or countries allowed"
                            ),
                        )
                    {
                        ok = false;
                    }
                    // Each entry once: every check of a site against the residency reads
                    // the lists (a list repeating one entry a million times made each load,
                    // and each router's graph, take minutes).
                    let mut seen_regions = HashSet::new();
                    let mut seen_countries = HashSet::new();
                    if let Some(rs) = r.get("regions") {
                        for rn in list(cx, rs, &Of("residency regions", &what)) {
                            match ident(cx, rn, &Of("residency region", &what)) {
                                Some(reg) if regions.contains(&reg) => {
                                    if seen_regions.insert(reg.clone()) {
                                        residency.regions.push(Region::new(reg))
                                    }
                                }
                                Some(reg) => {
                                    let known =
                                        cx.known_list(&reg, regions.iter().map(String::as_str));
                                    cx.err(
                                        rn.pos,
                                        format!(
                                            "residency of {what}: unknown region {reg:?} {known}"
                                        ),
                                    );
                                    ok = false;
                                }
                                None => ok = false,
                            }
                        }
                    }
                    if let Some(cs) = r.get("countries") {
                        for cn in list(cx, cs, &Of("residency countries", &what)) {
                            match country(cx, cn, &Of("residency country", &what)) {
                                Some(c) if seen_countries.insert(c) => residency.countries.push(c),
                                Some(_) => {}
                                None => ok = false,
                            }
                        }
                    }
                }
                None => ok = false,
            }
        }
        let requires_circuit = match f.get("requires_circuit") {
            None => false,
            Some(n) => boolean(cx, n, &Of("requires_circuit", &what)).unwrap_or_else(|| {
                ok = false;
                false
            }),
        };
        let affinity = match f.get("affinity") {
            None => Affinity::None,
            Some(n) => affinity(cx, n, &Of("affinity", &what)).unwrap_or_else(|| {
                ok = false;
                Affinity::None
            }),
        };
        // Edges listen on a service's port; transparent mode and circuits take its VIPs (a
        // circuit's VIP gets the port, or the first VIP's). With neither, nothing reaches it.
        if ok && port.is_none() && service_vips.is_empty() && f.get("port").is_none() {
            cx.warn(
                name_pos,
                format!(
                    "{what} has no port and no vips: no client can reach it (edges listen on a \
                     service's port, transparent mode and circuits map its VIPs)"
                ),
            );
        }
        if let (true, Some(name)) = (ok, name) {
            if requires_circuit {
                circuit_only.push((
                    name.clone(),
                    f.key_pos("requires_circuit").unwrap_or(name_pos),
                ));
            }
            services.push((
                Service {
                    name: ServiceName::new(name),
                    port,
                    vips: service_vips,
                    clients,
                    residency,
                    requires_circuit,
                    affinity,
                },
                name_pos,
                f.key_pos("residency").unwrap_or(name_pos),
            ));
            service_entry.push(i);
        }
    }
    // VIPs that overlap one declared before them (same port, overlapping prefixes): each is
    // reported naming the first such VIP, and its service is left out. The VIPs kept are
    // disjoint per port, in declaration order (`vips`, with their service's name).
    let mut vips: Vec<(Vip, String)> = Vec::with_capacity(parsed_vips.len());
    // Kept for the backends' check below (a backend inside a VIP).
    let mut vip_index =
        overlap::Disjoint::new(parsed_vips.iter().map(|(v, _, _)| (v.port, v.prefix)));
    {
        let mut overlapping = vec![false; service_items.len()];
        let mut any = false;
        for (c, (vip, pos, owner)) in parsed_vips.iter().enumerate() {
            let (what, name, entry) = &owners[*owner];
            if let Some(first) = vip_index.first_overlap(vip.port, vip.prefix) {
                let (other, other_owner) = &vips[first];
                cx.err(
                    *pos,
                    format!("VIP of {what}: {vip} overlaps {other} of service \"{other_owner}\""),
                );
                overlapping[*entry] = true;
                any = true;
            } else {
                vip_index.add(c, vip.port, vip.prefix, vips.len());
                vips.push((*vip, name.clone()));
            }
        }
        if any {
            let mut keep = service_entry.iter().map(|&i| !overlapping[i]);
            services.retain(|_| keep.next().unwrap_or(true));
        }
    }

    // Sites' `serves`, now that services are known.
    let mut mentioned: HashSet<String> = HashSet::new();
    // Every backend parsed, with its site and service, for the loop check below.
    let mut backends: Vec<(String, String, SocketAddr, Pos)> = Vec::new();
    for e in entries.iter_mut() {
        let Some(serves) = e.fields.get("serves") else {
            continue;
        };
        let what = e.fields.what.clone();
        let mut served: HashMap<String, Pos> = HashMap::new();
        let mut incomplete = false;
        for (j, item) in list(cx, serves, &Of("serves", &what)).iter().enumerate() {
            let sw = format!("serves entry {} of {what}", j + 1);
            let Some(sf) = fields(cx, item, &sw, SERVES_FIELDS) else {
                incomplete = true;
                continue;
            };
            let service = sf.required(cx, "service").and_then(|n| {
                let s = ident(cx, n, &Of("service", &sw))?;
                if !service_names.contains_key(s.as_str()) {
                    let known = cx.known_list(&s, service_names.keys().map(String::as_str));
                    cx.err(n.pos, format!("unknown service \"{s}\" in {sw} {known}"));
                    return None;
                }
                if let Some(first) = served.get(s.as_str()) {
                    cx.err(
                        n.pos,
                        format!("{what} serves \"{s}\" twice (first at line {})", first.line),
                    );
                    return None;
                }
                served.insert(s.clone(), n.pos);
                mentioned.insert(s.clone());
                Some(s)
            });
            let backend_pos = sf.get("backend").map(|n| n.pos);
            let backend = sf
                .required(cx, "backend")
                .and_then(|n| socket_addr(cx, n, &Of("backend", &sw), "127.30.0.1:8000"));
            // The site connects to it: one host's address (the unspecified address is the
            // site's own host, as `connect` reads it). A rule added after texts were stored:
            // only a warning on a stored one.
            let backend = backend.filter(|b| {
                let not = not_unicast(b.ip()).filter(|_| !b.ip().to_canonical().is_unspecified());
                match (not, backend_pos) {
                    (Some(not), Some(pos)) => !cx.newer(
                        pos,
                        format!(
                            "{}: {b} is {not}, which the site cannot connect to",
                            Of("backend", &sw)
                        ),
                    ),
                    _ => true,
                }
            });
            let capacity = sf
                .required(cx, "capacity")
                .and_then(|n| integer(cx, n, &Of("capacity", &sw), 1, u32::MAX.into()))
                .and_then(|c| u32::try_from(c).ok());
            let weight = match sf.get("weight") {
                None => Some(default_weight()),
                Some(n) => integer(cx, n, &Of("weight", &sw), 1, 1_000_000)
                    .and_then(|w| u32::try_from(w).ok()),
            };
            let dial = match sf.get("dial") {
                None => Some(default_dial()),
                Some(n) => integer(cx, n, &Of("dial", &sw), 0, FULL_DIAL.into())
                    .and_then(|d| u8::try_from(d).ok()),
            };
            let health_check = match sf.get("health_check") {
                None => Some(None),
                Some(n) => string(cx, n, &Of("health_check", &sw)).and_then(|p| {
                    if is_valid_health_path(p) {
                        Some(Some(p.to_string()))
                    } else {
                        let shown: String = p.chars().take(80).collect();
                        cx.err(
                            n.pos,
                            format!(
                                "health_check of {sw}: {shown:?} is not an HTTP path (a `/` then \
                                 visible ASCII, no spaces, at most {MAX_HEALTH_PATH} bytes, e.g. /health)"
                            ),
                        );
                        None
                    }
                }),
            };
            let health = health_policy(cx, &sf, &sw);
            match (
                service,
                backend,
                capacity,
                weight,
                dial,
                health_check,
                health,
            ) {
                (
                    Some(service),
                    Some(backend),
                    Some(capacity),
                    Some(weight),
                    Some(dial),
                    Some(health_check),
                    Some(health),
                ) => {
                    if let (Some(id), Some(pos)) = (&e.id, backend_pos) {
                        backends.push((id.clone(), service.clone(), backend, pos));
                    }
                    if let Some(node) = &mut e.node {
                        node.serves.push(SiteService {
                            service: ServiceName::new(service),
                            backend,
                            capacity,
                            weight,
                            dial,
                            health_check,
                            health,
                        });
                    }
                }
                _ => incomplete = true,
            }
        }
        if incomplete {
            e.node = None;
        }
    }

    // Links.
    let link_items = top
        .get("links")
        .map(|n| list(cx, n, &"links"))
        .unwrap_or(&[]);
    if link_items.len() > MAX_LINKS {
        cx.err(
            top.key_pos("links").unwrap_or(top.pos),
            format!(
                "{} links is over the limit of {MAX_LINKS}",
                link_items.len()
            ),
        );
        return None;
    }
    let mut links: Vec<Link> = Vec::with_capacity(link_items.len());
    let mut link_ids: HashMap<LinkId, (usize, Pos)> = HashMap::with_capacity(link_items.len());
    let mut links_ok = true;
    for (i, item) in link_items.iter().enumerate() {
        let what = format!("link {}", i + 1);
        let Some(f) = fields(cx, item, &what, LINK_FIELDS) else {
            links_ok = false;
            continue;
        };
        let end = |cx: &mut Cx, field: &str| {
            let n = f.required(cx, field)?;
            let s = string(cx, n, &Of(field, &what))?;
            if ids.contains_key(s) {
                Some((NodeId::new(s), n.pos))
            } else {
                let known = cx.known_list(s, ids.keys().map(String::as_str));
                cx.err(n.pos, format!("unknown node {s:?} in {what} {known}"));
                None
            }
        };
        let a = end(cx, "a");
        let b = end(cx, "b");
        let latency = f
            .required(cx, "latency")
            .and_then(|n| parse_with(cx, n, &Of("latency", &what), Latency::from_str));
        let capacity = f
            .required(cx, "capacity")
            .and_then(|n| capacity(cx, n, &Of("capacity", &what)));
        let st = f.get("state").map(|n| state(cx, n, &Of("state", &what)));
        let mut ends_ok = false;
        if let (Some((a, _)), Some((b, bpos))) = (&a, &b) {
            if a == b {
                cx.err(*bpos, format!("{what} connects node \"{a}\" to itself"));
            } else {
                let lid = LinkId::new(a, b);
                if let Some((first, fpos)) = link_ids.get(&lid) {
                    cx.err(
                        f.pos,
                        format!("duplicate link {lid}: {what} joins the same nodes as link {} (line {})", first + 1, fpos.line),
                    );
                } else {
                    link_ids.insert(lid, (i, f.pos));
                    ends_ok = true;
                }
            }
        }
        match (a, b, latency, capacity, st) {
            (Some((a, _)), Some((b, _)), Some(latency), Some(capacity), st)
                if ends_ok && st.is_none_or(|s| s.is_some()) =>
            {
                links.push(Link {
                    a,
                    b,
                    latency,
                    capacity,
                    state: st.flatten().unwrap_or_default(),
                })
            }
            _ => links_ok = false,
        }
    }

    // Pools.
    let pool_items = top
        .get("pools")
        .map(|n| list(cx, n, &"pools"))
        .unwrap_or(&[]);
    let mut pools: Vec<Pool> = Vec::new();
    let mut pools_ok = true;
    // Edges' client addresses, sorted, for the pools' check (a circuit VIP equal to one would
    // classify every connection to that edge's service listeners as the circuit's). A wildcard
    // stands for whatever the edge's host has, which the topology does not say.
    let mut edge_clients: Vec<(IpAddr, &str)> = entries
        .iter()
        .filter_map(|e| Some((e.node.as_ref()?.client_address?, e.id.as_deref()?)))
        .filter(|(ip, _)| !ip.is_unspecified())
        .map(|(ip, id)| (ip.to_canonical(), id))
        .collect();
    edge_clients.sort_unstable();
    // First what each entry says; then, in order, the checks that decide whether it is kept:
    // its name against every pool before it that has a valid one, kept or not (a name taken by
    // a pool refused for its prefix is still taken once that is fixed), and its prefix against
    // the prefixes held before it (those of the pools kept, and of a pool refused only for an
    // invalid name, which would still overlap once that is fixed). The prefix's own
    // diagnostics are kept aside until then: a pool whose name is taken is reported for that
    // alone.
    struct PoolEntry {
        name: Option<(String, Pos)>,
        what: String,
        prefix_diags: Vec<Diagnostic>,
        prefix: Option<(IpNetwork, Pos)>,
    }
    let mut pool_entries: Vec<PoolEntry> = Vec::with_capacity(pool_items.len());
    for (i, item) in pool_items.iter().enumerate() {
        let label = format!("pool {}", i + 1);
        let Some(f) = fields(cx, item, &label, POOL_FIELDS) else {
            pools_ok = false;
            continue;
        };
        let name_node = f.required(cx, "name");
        let name = name_node.and_then(|n| Some((ident(cx, n, &Of("name", &label))?, n.pos)));
        let what = name
            .as_ref()
            .map(|(n, _)| format!("pool \"{n}\""))
            .unwrap_or(label);
        let mut aside = Cx::new(cx.texts);
        let pfx_node = f.required(&mut aside, "prefix");
        let prefix =
            pfx_node.and_then(|n| Some((prefix(&mut aside, n, &Of("prefix", &what))?, n.pos)));
        pool_entries.push(PoolEntry {
            name,
            what,
            prefix_diags: aside.diags.into_iter().map(|k| k.0).collect(),
            prefix,
        });
    }
    let prefixes: Vec<IpNetwork> = pool_entries
        .iter()
        .filter_map(|e| Some(e.prefix?.0))
        .collect();
    let vip_overlaps = overlap::first_overlaps(
        &vips
            .iter()
            .enumerate()
            .map(|(o, (v, _))| (v.prefix, o))
            .collect::<Vec<_>>(),
        &prefixes,
    );
    let mut kept = overlap::Disjoint::new(prefixes.iter().map(|&p| ((), p)));
    // The prefixes held in `kept`, by the order `kept` returns, each with how messages name
    // its pool (`pool "x"`, or `pool 3` for one whose name is invalid).
    let mut held: Vec<(IpNetwork, String)> = Vec::new();
    let mut pool_names: HashMap<String, Pos> = HashMap::new();
    let mut candidate = 0;
    for e in pool_entries {
        let what = &e.what;
        // This entry's index among those with a prefix (`prefixes`, `kept`'s candidates).
        let c = candidate;
        candidate += usize::from(e.prefix.is_some());
        if let Some((n, pos)) = &e.name {
            if let Some(first) = pool_names.get(n) {
                cx.err(
                    *pos,
                    format!(
                        "duplicate pool name \"{n}\" (first defined at line {})",
                        first.line
                    ),
                );
                pools_ok = false;
                continue;
            }
            pool_names.insert(n.clone(), *pos);
        }
        for d in e.prefix_diags {
            cx.push(d);
        }
        let Some((p, pos)) = e.prefix else {
            pools_ok = false;
            continue;
        };
        if let Some(first) = kept.first_overlap((), p) {
            let (other, owner) = &held[first];
            cx.err(
                pos,
                format!("prefix of {what}: {p} overlaps {other} of {owner}"),
            );
            pools_ok = false;
            continue;
        }
        if let Some((vip, owner)) = vip_overlaps[c].map(|o| &vips[o]) {
            cx.err(
                pos,
                format!("prefix of {what}: {p} overlaps VIP {vip} of service \"{owner}\""),
            );
            pools_ok = false;
            continue;
        }
        // A pool hands its addresses out as VIPs the edges bind and clients dial: one holding
        // the unspecified address (`0.0.0.0/32` handed out `0.0.0.0`, a wildcard listener that
        // took the port from every other VIP), multicast or broadcast addresses is none of
        // those. Its first and last addresses tell (the special ranges are prefixes).
        if let Some((ip, not)) = [p.network(), last_address(p)]
            .into_iter()
            .find_map(|ip| Some((ip, not_unicast(ip)?)))
            && cx.newer(
                pos,
                format!(
                    "prefix of {what}: {p} holds {ip}, {not}: a pool's addresses are VIPs that \
                     edges bind and clients dial (use a unicast prefix)"
                ),
            )
        {
            pools_ok = false;
            continue;
        }
        let first = edge_clients.partition_point(|(ip, _)| *ip < p.network());
        if let Some((ip, edge)) = edge_clients.get(first).filter(|(ip, _)| p.contains(*ip))
            && cx.newer(
                pos,
                format!(
                    "prefix of {what}: {p} contains {ip}, the client_address of edge node \"{edge}\""
                ),
            )
        {
            pools_ok = false;
            continue;
        }
        kept.add(c, (), p, held.len());
        held.push((p, e.what));
        match e.name {
            Some((name, _)) => {
                pools.push(Pool {
                    name: PoolName::new(name),
                    prefix: p,
                });
            }
            None => pools_ok = false,
        }
    }

    // Cross-checks that need everything above.
    let any_port = services.iter().any(|(s, _, _)| s.port.is_some());
    // The services listening on edges, for an edge without a client_address: the first few
    // and a count, made once (named in full, once per such edge, 10,000 services on 50,000
    // edges were 32 GB of messages).
    let with_port = {
        let named: Vec<&str> = services
            .iter()
            .filter(|(s, _, _)| s.port.is_some())
            .map(|(s, _, _)| s.name.as_str())
            .collect();
        crate::diag::first_few(named.into_iter(), UNREACHABLE_SHOWN)
    };
    let mut client_addrs: HashMap<IpAddr, String> = HashMap::new();
    for e in &entries {
        let (Some(id), Some(kind)) = (&e.id, e.kind) else {
            continue;
        };
        // The transparent listener binds the same IP as the service listeners (the edge's
        // client_address), so on a service's port it would take that service's place.
        if let (Some(tp), Some(n)) = (
            e.node.as_ref().and_then(|n| n.transparent_port),
            e.fields.get("transparent_port"),
        ) && let Some(other) = ports.get(&tp)
        {
            cx.newer(
                n.pos,
                format!(
                    "transparent_port of node \"{id}\": {tp} is already the port of service \"{other}\""
                ),
            );
        }
        // Without a client_address the edge binds its transparent port on 127.0.0.1: iptables
        // REDIRECT gives a packet arriving on another interface that interface's address, which
        // nothing listens on, so only connections made on the edge's own host reach it.
        if kind == NodeKind::Edge
            && e.fields.get("client_address").is_none()
            && let (Some(tp), Some(n)) = (
                e.node.as_ref().and_then(|n| n.transparent_port),
                e.fields.get("transparent_port"),
            )
        {
            cx.warn(
                n.pos,
                format!(
                    "transparent_port of node \"{id}\": without a client_address, {tp} is bound on 127.0.0.1 and takes only connections redirected on the edge's own host, not traffic arriving on its interfaces"
                ),
            );
        }
        match kind {
            NodeKind::Edge => match e.fields.get("client_address") {
                None if any_port => {
                    cx.err(
                        e.id_pos,
                        format!(
                            "edge node \"{id}\" has no client_address, but services listen on edges ({with_port})"
                        ),
                    );
                }
                Some(n) => {
                    // A wildcard (0.0.0.0 or ::) binds every address of the edge's own host, so
                    // edges on different hosts may all use it.
                    // In the IPv4 form of a mapped address (`::ffff:a.b.c.d`, kept with a
                    // warning in a stored text): the same listener as the address it maps.
                    if let Some(Some(ip)) = e.node.as_ref().map(|n| n.client_address)
                        && !ip.to_canonical().is_unspecified()
                    {
                        if let Some(other) = client_addrs.get(&ip.to_canonical()) {
                            cx.err(n.pos, format!("client_address of node \"{id}\": {ip} is already used by edge node \"{other}\""));
                        } else {
                            client_addrs.insert(ip.to_canonical(), id.clone());
                        }
                    }
                }
                None => {}
            },
            NodeKind::Site
                if e.fields.get("serves").is_none_or(|s| {
                    matches!(&s.value, YValue::Seq(v) if v.is_empty())
                        || matches!(s.value, YValue::Null)
                }) =>
            {
                cx.warn(e.id_pos, format!("site node \"{id}\" serves no service"));
            }
            _ => {}
        }
    }
    loop_warnings(cx, &entries, &ports, &vip_index, &vips, &backends);
    // The nodes serving each service, in node order, gathered once: filtering every node per
    // service was services times serves entries (10,000 services on 50,000 nodes).
    let mut serving_by: HashMap<&str, Vec<&NodeEntry>> = HashMap::new();
    for e in &entries {
        for ss in e.node.iter().flat_map(|n| &n.serves) {
            serving_by.entry(ss.service.as_str()).or_default().push(e);
        }
    }
    for (s, pos, residency_pos) in &services {
        let serving: &[&NodeEntry] = serving_by.get(s.name.as_str()).map_or(&[], Vec::as_slice);
        if !mentioned.contains(s.name.as_str()) {
            cx.err(
                *pos,
                format!(
                    "service \"{}\" is served by no site (add it to a site's serves)",
                    s.name
                ),
            );
        } else if !serving.is_empty()
            && !serving
                .iter()
                .any(|e| e.node.as_ref().is_some_and(|n| s.residency.allows(n)))
        {
            let sites: Vec<&str> = serving.iter().filter_map(|e| e.id.as_deref()).collect();
            cx.err(
                *residency_pos,
                format!(
                    "residency of service \"{}\" allows none of the sites that serve it ({})",
                    s.name,
                    sites.join(", ")
                ),
            );
        }
    }

    // Every circuit takes its VIP from a pool: without one, none can be created, and a service
    // only circuits may reach is out of every client's reach (`circuit_refused`).
    if pools_ok && pools.is_empty() {
        for (name, pos) in &circuit_only {
            cx.warn(
                *pos,
                format!(
                    "requires_circuit of service \"{name}\": the topology has no pools, so no \
                     circuit can get a VIP and no client can reach it (add a pool)"
                ),
            );
        }
    }

    let complete = entries.iter().all(|e| e.node.is_some())
        && entries.len() == node_items.len()
        && services.len() == service_items.len()
        && links_ok
        && pools_ok;
    if !complete || cx.errors > 0 {
        return None;
    }
    let nodes: Vec<Node> = entries.into_iter().filter_map(|e| e.node).collect();
    let topology = Topology {
        nodes,
        links,
        services: services.into_iter().map(|(s, _, _)| s).collect(),
        pools,
    };
    {
        let index: HashMap<&str, usize> = topology
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.id.as_str(), i))
            .collect();
        if !links_of_one_family(cx, &topology, &index, &link_ids) {
            return None;
        }
        reachability_warnings(cx, &topology, &index, &ids);
        idle_link_warnings(cx, &topology, &index, &link_ids);
    }
    Some(topology)
}

/// Whether every link joins two nodes whose addresses are of one family (an IPv4-mapped IPv6
/// address counts as IPv4): a router listens on its one address, and an IPv4 socket cannot dial
/// an IPv6 address, nor an IPv6 one bound to a specific address an IPv4 one. Such a link is
/// refused at its line (a warning on a stored text, which is then taken as it is).
fn links_of_one_family(
    cx: &mut Cx,
    topology: &Topology,
    index: &HashMap<&str, usize>,
    link_ids: &HashMap<LinkId, (usize, Pos)>,
) -> bool {
    let family = |id: &NodeId| {
        index.get(id.as_str()).map(|&i| {
            let a = topology.nodes[i].address;
            (a, a.ip().to_canonical().is_ipv4())
        })
    };
    let mut ok = true;
    for l in &topology.links {
        let (Some((a, a4)), Some((b, b4))) = (family(&l.a), family(&l.b)) else {
            continue;
        };
        if a4 == b4 {
            continue;
        }
        let name = |v4: bool| if v4 { "IPv4" } else { "IPv6" };
        let id = l.id();
        let pos = link_ids.get(&id).map(|(_, p)| *p).unwrap_or_default();
        if cx.newer(
            pos,
            format!(
                "link {id} joins node \"{}\" ({} address {a}) and node \"{}\" ({} address {b}): a \
                 router listens on its one address, and cannot dial the other family (give both \
                 ends addresses of one family)",
                l.a,
                name(a4),
                l.b,
                name(b4)
            ),
        ) {
            ok = false;
        }
    }
    ok
}

/// A backend that is one of the fabric's own client listeners (a service's port or the
/// transparent port on an edge's client_address) or inside a service VIP sends each connection
/// the site makes back into the fabric, which routes it to a site again: a loop that holds a
/// connection at every turn until a cap refuses one. Warned, not refused: the same address may
/// be another host's (edges and sites on different hosts with private addresses). An edge
/// without a client_address (its listeners on 127.0.0.1) is not compared: a site's loopback
/// backend is on the site's own host.
fn loop_warnings(
    cx: &mut Cx,
    entries: &[NodeEntry],
    ports: &HashMap<u16, String>,
    vip_index: &overlap::Disjoint<u16>,
    vips: &[(Vip, String)],
    backends: &[(String, String, SocketAddr, Pos)],
) {
    if backends.is_empty() {
        return;
    }
    // Each edge's client address (not a wildcard: that is any address of the edge's own host,
    // which a topology does not tell), with the edge and its transparent port.
    let mut edges: HashMap<IpAddr, (&str, Option<u16>)> = HashMap::new();
    for n in entries.iter().filter_map(|e| e.node.as_ref()) {
        if n.kind == NodeKind::Edge
            && let Some(ip) = n.client_address
            && !ip.is_unspecified()
        {
            edges
                .entry(ip.to_canonical())
                .or_insert((n.id.as_str(), n.transparent_port));
        }
    }
    for (site, service, backend, pos) in backends {
        let ip = backend.ip().to_canonical();
        let what = if let Some((edge, transparent)) = edges.get(&ip) {
            if let Some(listening) = ports.get(&backend.port()) {
                Some(format!(
                    "edge node \"{edge}\"'s listener of service \"{listening}\""
                ))
            } else if *transparent == Some(backend.port()) {
                Some(format!("edge node \"{edge}\"'s transparent port"))
            } else {
                None
            }
        } else {
            None
        };
        let what = what.or_else(|| {
            let host = IpNetwork::from(ip);
            vip_index
                .first_overlap(backend.port(), host)
                .and_then(|i| vips.get(i))
                .map(|(vip, owner)| format!("inside VIP {vip} of service \"{owner}\""))
        });
        if let Some(what) = what {
            cx.warn(
                *pos,
                format!(
                    "backend of service \"{service}\" at site node \"{site}\": {backend} is {what}, so the site's connections would come back into the fabric (a loop)"
                ),
            );
        }
    }
}

/// Warns for each link between two edges or two sites (in link order): only transits relay, so
/// no client path can use it (its two routers still probe each other over it).
fn idle_link_warnings(
    cx: &mut Cx,
    t: &Topology,
    index: &HashMap<&str, usize>,
    link_ids: &HashMap<LinkId, (usize, Pos)>,
) {
    let kind = |id: &NodeId| index.get(id.as_str()).map(|&i| t.nodes[i].kind);
    for l in &t.links {
        let (Some(a), Some(b)) = (kind(&l.a), kind(&l.b)) else {
            continue;
        };
        if a != b || a == NodeKind::Transit {
            continue;
        }
        let id = l.id();
        if let Some(&(_, pos)) = link_ids.get(&id) {
            cx.warn(
                pos,
                format!("link {id} joins two {a}s: no path uses it, only transits relay"),
            );
        }
    }
}

fn location(cx: &mut Cx, node: &YNode, what: &dyn fmt::Display) -> Option<Location> {
    let f = fields(cx, node, &Of("location", &what), LOCATION_FIELDS)?;
    let lat = f.required(cx, "lat").and_then(|n| {
        let v = number(cx, n, &Of("lat", &what))?;
        if !(-90.0..=90.0).contains(&v) {
            cx.err(
                n.pos,
                format!("lat of {what}: {v} is out of range (-90 to 90)"),
            );
            return None;
        }
        Some(v)
    });
    let lon = f.required(cx, "lon").and_then(|n| {
        let v = number(cx, n, &Of("lon", &what))?;
        if !(-180.0..=180.0).contains(&v) {
            cx.err(
                n.pos,
                format!("lon of {what}: {v} is out of range (-180 to 180)"),
            );
            return None;
        }
        Some(v)
    });
    Some(Location {
        lat: lat?,
        lon: lon?,
    })
}

/// Services named in an edge's "cannot reach" warning (and in its "no client_address"
/// error); the others are counted.
const UNREACHABLE_SHOWN: usize = 5;

/// Warns for each edge from which no allowed site of some service can be reached over links and
/// nodes that are not down, with only transits relaying (as routing does). Transit connectivity
/// is computed once (union-find), so this stays linear.
///
/// One warning per edge, naming the first [`UNREACHABLE_SHOWN`] services it cannot reach and
/// how many more: one per (service, edge) was 10^7 warnings (gigabytes) for 1,000 services
/// and 10,000 cut-off edges.
fn reachability_warnings(
    cx: &mut Cx,
    t: &Topology,
    index: &HashMap<&str, usize>,
    ids: &HashMap<String, (usize, Pos)>,
) {
    let mut parent: Vec<usize> = (0..t.nodes.len()).collect();
    fn find(p: &mut [usize], mut x: usize) -> usize {
        while p[x] != x {
            p[x] = p[p[x]];
            x = p[x];
        }
        x
    }
    let usable: Vec<(usize, usize)> = t
        .links
        .iter()
        .filter(|l| l.state != AdminState::Down)
        .filter_map(|l| Some((*index.get(l.a.as_str())?, *index.get(l.b.as_str())?)))
        .filter(|&(a, b)| {
            t.nodes[a].state != AdminState::Down && t.nodes[b].state != AdminState::Down
        })
        .collect();
    let transit = |i: usize| t.nodes[i].kind == NodeKind::Transit;
    for &(a, b) in &usable {
        if transit(a) && transit(b) {
            let (ra, rb) = (find(&mut parent, a), find(&mut parent, b));
            parent[ra] = rb;
        }
    }
    // What each end node touches: the transit groups it links to, and (edges) itself. An edge
    // reaches a site when the two touch something in common: a transit group, or the edge itself
    // over a direct link.
    let mut touch: Vec<HashSet<usize>> = (0..t.nodes.len())
        .map(|i| {
            if t.nodes[i].kind == NodeKind::Edge {
                HashSet::from([i])
            } else {
                HashSet::new()
            }
        })
        .collect();
    for &(a, b) in &usable {
        for (x, y) in [(a, b), (b, a)] {
            if transit(x) {
                continue;
            }
            if transit(y) {
                let r = find(&mut parent, y);
                touch[x].insert(r);
            } else if t.nodes[x].kind == NodeKind::Site && t.nodes[y].kind == NodeKind::Edge {
                touch[x].insert(y);
            }
        }
    }
    // The allowed sites (not down) of each service, in node order.
    let service_index: HashMap<&str, usize> = t
        .services
        .iter()
        .enumerate()
        .map(|(k, s)| (s.name.as_str(), k))
        .collect();
    let mut sites: Vec<Vec<usize>> = vec![Vec::new(); t.services.len()];
    for (i, n) in t.nodes.iter().enumerate() {
        if n.state == AdminState::Down {
            continue;
        }
        for ss in &n.serves {
            if let Some(&k) = service_index.get(ss.service.as_str())
                && t.services[k].residency.allows(n)
            {
                sites[k].push(i);
            }
        }
    }
    // The services whose allowed sites touch each thing an edge may touch (a transit group,
    // or an edge linked directly to a site), as a bitset over the services: each site's
    // services are ORed into each thing it touches, a word at a time. (Lists of service
    // indexes, one entry per (service, site, thing touched), were 5 x 10^8 entries, gigabytes,
    // for one site serving 10,000 services linked directly to 50,000 edges.)
    let all = t.services.len();
    let words = all.div_ceil(64);
    let mut site_bits: HashMap<usize, Vec<u64>> = HashMap::new();
    for (k, at) in sites.iter().enumerate() {
        for &i in at {
            site_bits.entry(i).or_insert_with(|| vec![0; words])[k / 64] |= 1 << (k % 64);
        }
    }
    let mut reach: HashMap<usize, Vec<u64>> = HashMap::new();
    for (&i, bits) in &site_bits {
        for &c in &touch[i] {
            let r = reach.entry(c).or_insert_with(|| vec![0; words]);
            for (w, b) in r.iter_mut().zip(bits) {
                *w |= b;
            }
        }
    }
    let count = |bits: &[u64]| bits.iter().map(|w| w.count_ones() as usize).sum::<usize>();
    // The services the edge at hand reaches.
    let mut reached: Vec<u64> = vec![0; words];
    let site_text = |k: usize| {
        let names: Vec<&str> = sites[k]
            .iter()
            .take(5)
            .map(|&i| t.nodes[i].id.as_str())
            .collect();
        if names.is_empty() {
            return "no allowed site is up".to_string();
        }
        let more = if sites[k].len() > 5 {
            format!(" and {} more", sites[k].len() - 5)
        } else {
            String::new()
        };
        format!("allowed sites: {}{more}", names.join(", "))
    };
    for (i, n) in t.nodes.iter().enumerate() {
        if n.kind != NodeKind::Edge || n.state == AdminState::Down {
            continue;
        }
        reached.fill(0);
        for r in touch[i].iter().filter_map(|c| reach.get(c)) {
            for (w, b) in reached.iter_mut().zip(r) {
                *w |= b;
            }
        }
        let missing = all - count(&reached);
        if missing == 0 {
            continue;
        }
        let pos = ids.get(n.id.as_str()).map(|(_, p)| *p).unwrap_or_default();
        let mut shown = (0..all)
            .filter(|&k| reached[k / 64] & (1 << (k % 64)) == 0)
            .take(UNREACHABLE_SHOWN);
        let message = if missing == 1 {
            let k = shown.next().unwrap_or_default();
            format!(
                "edge node \"{}\" cannot reach any site of service \"{}\" over links that are not down, relayed by transits only ({})",
                n.id,
                t.services[k].name,
                site_text(k)
            )
        } else {
            let list: Vec<String> = shown
                .map(|k| format!("\"{}\" ({})", t.services[k].name, site_text(k)))
                .collect();
            let more = if missing > UNREACHABLE_SHOWN {
                format!(" and {} more", missing - UNREACHABLE_SHOWN)
            } else {
                String::new()
            };
            format!(
                "edge node \"{}\" cannot reach any site of {missing} services over links that are not down, relayed by transits only: {}{more}",
                n.id,
                list.join(", ")
            )
        };
        cx.warn(pos, message);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What loading `text` refuses it with, one line per diagnostic.
    fn load_errors(text: &str) -> Vec<String> {
        crate::load(text)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    fn two_edges(client_a: &str, client_b: &str) -> String {
        let node = |id: &str, kind: &str, n: u8, extra: &str| {
            format!(
                "  - {{id: {id}, kind: {kind}, region: au-east, country: AU, \
                 location: {{lat: -33.9, lon: 151.2}}, address: \"127.10.0.{n}:7000\"{extra}}}\n"
            )
        };
        format!(
            "version: 1\nnodes:\n{}{}{}links:\n  - {{a: e1, b: s1, latency: 1ms, capacity: 1Gbps}}\n  \
             - {{a: e2, b: s1, latency: 1ms, capacity: 1Gbps}}\nservices:\n  - {{name: chat, port: 8443}}\n",
            node(
                "e1",
                "edge",
                1,
                &format!(", client_address: \"{client_a}\"")
            ),
            node(
                "e2",
                "edge",
                2,
                &format!(", client_address: \"{client_b}\"")
            ),
            node(
                "s1",
                "site",
                3,
                ", serves: [{service: chat, backend: \"127.30.0.1:9001\", capacity: 8}]"
            ),
        )
    }

    /// Names the reader takes as any string (a field name, a link's end) are quoted escaped: a control character in them reached the terminal (an ANSI
    /// escape, or a newline starting a forged `FILE:LINE:COL: error:` line).
    #[test]
    fn names_quoted_in_messages_carry_no_control_characters() {
        let text = two_edges("127.20.0.1", "127.20.0.2")
            .replace(
                "links:\n",
                "\"\\e]0;x\\a\": 1\nlinks:\n  - {a: \"e1\\nt.yaml:1:1: error: forged\", b: s1, latency: 1ms, capacity: 1Gbps}\n",
            );
        let errs = load_errors(&text);
        for want in [
            "unknown field \"\\u{1b}]0;x\\u{7}\"",
            "unknown node \"e1\\nt.yaml:1:1: error: forged\"",
        ] {
            assert!(errs.iter().any(|m| m.contains(want)), "{want}: {errs:#?}");
        }
        assert!(
            errs.iter().all(|m| !m.chars().any(char::is_control)),
            "{errs:#?}"
        );
    }

    #[test]
    fn client_addresses_are_unique_across_edges_except_wildcards() {
        let errs = crate::load(&two_edges("127.20.0.1", "127.20.0.1")).unwrap_err();
        assert!(
            errs.iter().any(|d| d
                .to_string()
                .contains("127.20.0.1 is already used by edge node \"e1\"")),
            "{errs:?}"
        );
        for any in ["0.0.0.0", "::"] {
            let loaded = crate::load(&two_edges(any, any));
            assert!(loaded.is_ok(), "{any} on two edges: {:?}", loaded.err());
        }
    }

    /// An IPv4-mapped client address (kept, with a warning, in a stored text) is the address it
    /// maps: the same as another edge's IPv4 one, and a wildcard when it maps 0.0.0.0. (Compared
    /// as written, two edges on one listener loaded without a word, and two mapped wildcards
    /// were "already used".)
    #[test]
    fn a_mapped_client_address_is_compared_as_the_address_it_maps() {
        let errs = crate::load_stored(&two_edges("127.20.0.1", "::ffff:127.20.0.1")).unwrap_err();
        assert!(
            errs.iter().any(|d| d
                .to_string()
                .contains("is already used by edge node \"e1\"")),
            "{errs:?}"
        );
        let loaded = crate::load_stored(&two_edges("::ffff:0.0.0.0", "::ffff:0.0.0.0"));
        assert!(
            loaded.as_ref().is_ok_and(|l| l
                .warnings
                .iter()
                .all(|w| !w.to_string().contains("already used"))),
            "{:?}",
            loaded.err()
        );
    }

    /// An integer too long for any integer type is out of range, like a shorter one (it was
    /// "must be an integer, found a number": the YAML reader takes it for a float); a fraction
    /// is still not an integer.
    #[test]
    fn an_integer_of_43_digits_is_out_of_range_not_a_number() {
        let text = two_edges("127.20.0.1", "127.20.0.2");
        let long = "1".repeat(43);
        let errs = load_errors(&text.replacen("port: 8443", &format!("port: {long}"), 1));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].ends_with("port of service \"chat\": 111111111111111111111111... (43 characters) is out of range (expected 1 to 65535)"),
            "{errs:?}"
        );
        // As long as a float can hold (400 digits), and in hex: the same.
        for long in ["1".repeat(400), format!("0x{}", "f".repeat(40))] {
            let errs = load_errors(&text.replacen("port: 8443", &format!("port: {long}"), 1));
            assert_eq!(errs.len(), 1, "{errs:?}");
            assert!(
                errs[0].contains("is out of range (expected 1 to 65535)"),
                "{errs:?}"
            );
        }
        let errs = load_errors(&text.replacen("port: 8443", "port: 8443.5", 1));
        assert!(
            errs[0].ends_with("port of service \"chat\" must be an integer, found a number"),
            "{errs:?}"
        );
    }

    /// `.nan` and `.inf` are YAML floats, but not coordinates: the message says so (it said
    /// "must be a number, found a number").
    #[test]
    fn a_coordinate_that_is_not_finite_is_named_as_such() {
        let text = two_edges("127.20.0.1", "127.20.0.2").replacen(
            "lat: -33.9, lon: 151.2",
            "lat: .nan, lon: -.inf",
            1,
        );
        let errs = load_errors(&text);
        assert_eq!(
            errs,
            [
                "3:72: error: lat of node \"e1\" must be a finite number, found .nan",
                "3:83: error: lon of node \"e1\" must be a finite number, found an infinity",
            ]
        );
    }

    /// A byte rate with a lower-case prefix (`1gBps`) is refused in a new text like `1GBps`,
    /// and a stored text keeps the reading earlier builds gave it (bits), with a warning.
    #[test]
    fn a_byte_rate_with_a_lower_case_prefix_is_refused_but_a_stored_one_reads_as_bits() {
        let text = two_edges("127.20.0.1", "127.20.0.2").replacen("1Gbps", "1gBps", 1);
        let errs = load_errors(&text);
        assert_eq!(
            errs,
            [
                "7:44: error: capacity of link 1: \"1gBps\" reads as bytes per second: rates are in \
              bits per second (write \"8Gbps\" for that many bytes per second)"
            ]
        );
        let stored = crate::load_stored(&text).unwrap_or_else(|d| panic!("{d:?}"));
        assert_eq!(stored.warnings.len(), 1, "{:?}", stored.warnings);
        assert_eq!(
            stored.topology.links[0].capacity,
            Bandwidth::from_mbps(1_000)
        );
    }

    /// A stored text's byte rate is read as bits, as earlier builds did; when that reading is
    /// refused too (`1.5Bps` as `1.5bps`, not a whole number; `0.5Bps` as `0.5bps`, under
    /// 1bps), it is an error. The link was dropped with only the byte-rate warning, and
    /// `load_stored` failed without an error to show.
    #[test]
    fn a_stored_byte_rate_that_bits_cannot_read_either_is_an_error() {
        for (rate, why) in [
            (
                "1.5Bps",
                "read as bits per second, as earlier builds did: \"1.5bps\" is not a whole \
                 number of bits per second",
            ),
            (
                "0.5Bps",
                "read as bits per second, as earlier builds did: \"0.5bps\" is below the \
                 smallest value, 1bps",
            ),
            (
                "1.4Bps",
                "\"1.4Bps\" reads as bytes per second: rates are in bits per second, and that \
                 many bytes per second is not a whole number of bits per second",
            ),
        ] {
            let text = two_edges("127.20.0.1", "127.20.0.2").replacen("1Gbps", rate, 1);
            let diags = crate::load_stored(&text).unwrap_err();
            let errors: Vec<String> = diags
                .iter()
                .filter(|d| d.is_error())
                .map(ToString::to_string)
                .collect();
            assert_eq!(
                errors,
                [format!("7:44: error: capacity of link 1: {why}")],
                "{rate}: {diags:?}"
            );
        }
    }

    /// A backend the site cannot connect to (multicast, broadcast) is refused at its line, a
    /// warning on a stored text; the unspecified address (the site's own host) is taken.
    #[test]
    fn a_multicast_or_broadcast_backend_is_refused() {
        for (backend, not) in [
            ("224.0.0.1:9000", "a multicast address"),
            ("255.255.255.255:9000", "the broadcast address"),
            ("[ff02::1]:9000", "a multicast address"),
        ] {
            let text = two_edges("127.20.0.1", "127.20.0.2").replace("127.30.0.1:9001", backend);
            let errs = load_errors(&text);
            assert_eq!(errs.len(), 1, "{errs:?}");
            assert!(
                errs[0].contains("backend of serves entry 1 of node \"s1\": ")
                    && errs[0].ends_with(&format!("is {not}, which the site cannot connect to")),
                "{errs:?}"
            );
            let stored = crate::load_stored(&text).unwrap_or_else(|d| panic!("{d:?}"));
            assert_eq!(stored.warnings.len(), 1, "{:?}", stored.warnings);
        }
        let text = two_edges("127.20.0.1", "127.20.0.2").replace("127.30.0.1:9001", "0.0.0.0:9001");
        crate::load(&text).unwrap_or_else(|d| panic!("{d:?}"));
    }

    /// A service with neither a port nor VIPs loads with a warning naming it: no listener, no
    /// transparent mapping and no circuit reaches it.
    #[test]
    fn a_service_without_port_or_vips_is_a_warning() {
        let text = two_edges("127.20.0.1", "127.20.0.2")
            .replace("{name: chat, port: 8443}", "{name: chat}");
        let loaded = crate::load(&text).unwrap_or_else(|d| panic!("{d:?}"));
        let warnings: Vec<String> = loaded.warnings.iter().map(ToString::to_string).collect();
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("service \"chat\" has no port and no vips")),
            "{warnings:?}"
        );
        let with_port = crate::load(&two_edges("127.20.0.1", "127.20.0.2")).unwrap();
        assert!(
            !with_port
                .warnings
                .iter()
                .any(|w| w.to_string().contains("no port")),
            "{:?}",
            with_port.warnings
        );
    }

    /// A service only circuits may reach, in a topology without pools, loads with a warning at
    /// its flag: no circuit can get a VIP, so no client reaches it. With a pool, none.
    #[test]
    fn a_circuit_only_service_without_pools_is_a_warning() {
        let text = two_edges("127.20.0.1", "127.20.0.2").replace(
            "{name: chat, port: 8443}",
            "{name: chat, port: 8443, requires_circuit: true}",
        );
        let loaded = crate::load(&text).unwrap_or_else(|d| panic!("{d:?}"));
        let warnings: Vec<String> = loaded.warnings.iter().map(ToString::to_string).collect();
        let line = text
            .lines()
            .position(|l| l.contains("requires_circuit"))
            .unwrap()
            + 1;
        assert!(
            warnings.iter().any(|w| w.starts_with(&format!("{line}:"))
                && w.contains("requires_circuit of service \"chat\": the topology has no pools")),
            "{warnings:?}"
        );
        let pooled = format!("{text}pools:\n  - {{name: vips, prefix: 10.99.0.0/24}}\n");
        let loaded = crate::load(&pooled).unwrap_or_else(|d| panic!("{d:?}"));
        assert!(
            !loaded
                .warnings
                .iter()
                .any(|w| w.to_string().contains("no pools")),
            "{:?}",
            loaded.warnings
        );
    }

    /// `nodes: []` is refused like a `nodes:` with nothing after it (tests/invalid/empty_nodes),
    /// at the list; a stored text with it still loads, with a warning.
    #[test]
    fn an_empty_list_of_nodes_is_refused() {
        let text = "version: 1\nnodes: []\n";
        let errs = load_errors(text);
        assert_eq!(
            errs,
            ["2:8: error: nodes is an empty list: a topology needs at least one node"]
        );
        let stored = crate::load_stored(text).unwrap_or_else(|d| panic!("{d:?}"));
        assert!(stored.topology.nodes.is_empty());
        assert_eq!(stored.warnings.len(), 1, "{:?}", stored.warnings);
    }

    /// A capacity with a fraction of a bit per second that earlier builds' float tolerance
    /// rounded (`1.0009bps`) is refused in a new text, and read as they read it, with a warning,
    /// in a stored one: an upgraded controller still starts on its text. (Refused in both, it
    /// stopped the start.)
    #[test]
    fn a_fractional_capacity_earlier_builds_rounded_is_a_warning_on_a_stored_text() {
        let text = two_edges("127.20.0.1", "127.20.0.2").replacen(
            "capacity: 1Gbps",
            "capacity: 1.0009bps",
            1,
        );
        let errs = load_errors(&text);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].ends_with("\"1.0009bps\" is not a whole number of bits per second"),
            "{errs:?}"
        );
        let stored = crate::load_stored(&text).unwrap_or_else(|d| panic!("{d:?}"));
        assert_eq!(stored.topology.links[0].capacity.bps(), 1);
        let warnings: Vec<String> = stored.warnings.iter().map(ToString::to_string).collect();
        assert_eq!(
            warnings,
            [format!(
                "{} (accepted in this stored version; a new text is refused for it)",
                errs[0].replace("error", "warning")
            )]
        );
    }

    /// A zoned IPv6 address (`[fe80::1%2]:7000`) names an interface of one host, which
    /// neighbours on other hosts cannot dial: refused as that, naming the field. (Its scope id
    /// was dropped by the IPv4-mapped check's comparison, which then called it IPv4-mapped and
    /// suggested `[fe80::1]:7000`.) A stored text with one loads, with a warning.
    #[test]
    fn a_node_address_with_a_zone_is_refused_as_such_not_as_ipv4_mapped() {
        let text = two_edges("127.20.0.1", "127.20.0.2").replacen(
            "\"127.10.0.1:7000\"",
            "\"[fe80::1%2]:7000\"",
            1,
        );
        let errs = load_errors(&text);
        assert_eq!(
            errs,
            [
                "3:101: error: address of node \"e1\": [fe80::1%2]:7000 has a zone (%2), an \
                 interface of one host, which neighbours on other hosts cannot dial (use a \
                 global or unique local address, without a zone)"
            ]
        );
        let stored = crate::load_stored(&text).unwrap_or_else(|d| panic!("{d:?}"));
        let warnings: Vec<String> = stored.warnings.iter().map(ToString::to_string).collect();
        assert_eq!(
            warnings[0],
            format!(
                "{} (accepted in this stored version; a new text is refused for it)",
                errs[0].replace("error", "warning")
            )
        );
        // Its link to an IPv4 node, taken as it is too.
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings[1].contains("link e1--s1 joins node \"e1\" (IPv6 address"),
            "{warnings:?}"
        );
        // Zone 0 too: it parses to scope id 0, as no zone does. (It was accepted.)
        let zero = text.replacen("%2]", "%0]", 1);
        let errs = load_errors(&zero);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].contains("has a zone (%0)"), "{errs:?}");
    }

    /// An empty `clients` means "any client" to the edges, so `clients: []` (a list emptied by
    /// mistake) opened an access-controlled service to everyone, silently: refused at the
    /// list, like a `clients:` with nothing after it (tests/invalid/empty_clients). A stored text
    /// with it still loads, with a warning, and its service still allows any client.
    #[test]
    fn an_empty_list_of_clients_is_refused_rather_than_allowing_any_client() {
        let text = two_edges("127.20.0.1", "127.20.0.2").replacen(
            "{name: chat, port: 8443}",
            "{name: chat, port: 8443, clients: []}",
            1,
        );
        let errs = load_errors(&text);
        assert_eq!(
            errs,
            [
                "10:39: error: clients of service \"chat\" is an empty list: omit the field to \
                 allow any client, or list the client prefixes allowed"
            ]
        );
        let stored = crate::load_stored(&text).unwrap_or_else(|d| panic!("{d:?}"));
        assert_eq!(stored.warnings.len(), 1, "{:?}", stored.warnings);
        assert!(stored.topology.services[0].clients.is_empty());
    }

    /// A pool name is taken by the first pool that has it, kept or not: the second "wide" was
    /// not reported when the first was refused (here for host bits), so fixing that one then
    /// revealed the duplicate. And a pool refused only for its name still holds its prefix: a
    /// pool inside it was not reported.
    #[test]
    fn a_pool_name_is_a_duplicate_even_of_a_refused_pool() {
        let text = two_edges("127.20.0.1", "127.20.0.2")
            + "pools:\n  - {name: wide, prefix: 10.0.0.1/16}\n  - {name: wide, prefix: 10.1.0.0/16}\n  \
               - {name: Bad-Name, prefix: 10.2.0.0/16}\n  - {name: inner, prefix: 10.2.7.0/24}\n";
        let errs = load_errors(&text);
        assert_eq!(
            errs,
            [
                "12:26: error: prefix of pool \"wide\": 10.0.0.1/16 has host bits set (did you \
                 mean 10.0.0.0/16?)",
                "13:12: error: duplicate pool name \"wide\" (first defined at line 12)",
                "14:12: error: name of pool 3: \"Bad-Name\" is not a valid id (1-63 lowercase \
                 letters and digits joined by single hyphens, e.g. syd-edge-1)",
                "15:27: error: prefix of pool \"inner\": 10.2.7.0/24 overlaps 10.2.0.0/16 of pool 3",
            ]
        );
    }

    /// A residency that allows none of the service's sites is reported at the `residency`
    /// field, the one to change (it was at the service's name).
    #[test]
    fn a_residency_that_allows_no_serving_site_is_reported_at_the_residency() {
        let text = two_edges("127.20.0.1", "127.20.0.2").replacen(
            "{name: chat, port: 8443}",
            "{name: chat, port: 8443, residency: {countries: [NZ]}}",
            1,
        );
        assert_eq!(
            load_errors(&text),
            [
                "10:30: error: residency of service \"chat\" allows none of the sites that serve it (s1)"
            ]
        );
    }

    /// An unknown name past the first [`MAX_HINTED_NAMES`] (or one too long for a hint) costs
    /// nothing per known name: the count is the iterator's exact length, not walked from the map
    /// each time (it was, for every unknown name: quadratic in a renamed fabric).
    #[test]
    fn unknown_names_past_the_hinted_ones_do_not_walk_the_known_ones() {
        use std::cell::Cell;
        let names: Vec<String> = (0..1000).map(|i| format!("node-{i}")).collect();
        let walked = Cell::new(0usize);
        let known = || {
            names.iter().map(|n| {
                walked.set(walked.get() + 1);
                n.as_str()
            })
        };
        let mut cx = Cx::new(Texts::New);
        cx.hinted = MAX_HINTED_NAMES;
        let long = "x".repeat(MAX_HINTED_LEN + 1);
        for word in ["nod-1", long.as_str()] {
            let hint = cx.known_list(word, known());
            assert!(hint.starts_with("(1000 known"), "{hint}");
        }
        assert_eq!(walked.get(), 0);
        // The first hinted names still get the closest ones, and the count.
        cx.hinted = 0;
        assert!(
            cx.known_list("nod-1", known())
                .starts_with("(closest of 1000 known: node-1, "),
        );
    }

    /// Once an unknown name's hint would pass the budget, later ones take the cheap answer:
    /// the known names are not walked again for each. (Each walked and copied them all, then
    /// refused: 500,000 unknown link ends against 50,000 ids took minutes.)
    #[test]
    fn a_spent_hint_budget_walks_the_known_names_no_more() {
        use std::cell::Cell;
        let names: Vec<String> = (0..1000).map(|i| format!("node-{i}")).collect();
        let walked = Cell::new(0usize);
        let known = || {
            names.iter().map(|n| {
                walked.set(walked.get() + 1);
                n.as_str()
            })
        };
        let mut cx = Cx::new(Texts::New);
        cx.hint_cells = 10;
        let first = cx.known_list("nod-1", known());
        assert!(first.contains("too many to search"), "{first}");
        let walked_once = walked.get();
        for _ in 0..100 {
            let hint = cx.known_list("nod-2", known());
            assert_eq!(hint, "(1000 known; too many to search for the closest)");
        }
        assert_eq!(walked.get(), walked_once);
    }

    /// Unknown field names past the first [`MAX_HINTED_NAMES`] get no "did you mean" (each is
    /// a distance to every allowed field).
    #[test]
    fn unknown_field_names_past_the_hinted_ones_get_no_hint() {
        let mut text = String::from("version: 1\nnodes:\n  - {");
        for _ in 0..MAX_HINTED_NAMES + 5 {
            text.push_str("idd: 0, ");
        }
        text.push_str("}\n");
        let errs = crate::load(&text).unwrap_err();
        let hinted = errs
            .iter()
            .filter(|d| d.to_string().contains("did you mean \"id\""))
            .count();
        assert_eq!(hinted, MAX_HINTED_NAMES, "{errs:?}");
    }

    #[test]
    fn closest_suggests_near_misses_only() {
        assert_eq!(
            closest("latncy", LINK_FIELDS.iter().copied()),
            Some("latency")
        );
        assert_eq!(closest("zzzzzz", LINK_FIELDS.iter().copied()), None);
    }
}
