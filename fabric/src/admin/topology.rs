//! Topology routes: get, history, apply (and dry run), rollback.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};

use super::{AdminState, ApiError, NoQuery, held_json, off_workers};
use crate::circuits::api::actor;
use crate::controller::ApplyOutcome;
use crate::controller::records::{Origin, TopologyVersion, VersionMeta};

pub fn routes() -> axum::Router<AdminState> {
    axum::Router::new()
        .route("/v1/topology", get(current).post(apply))
        .route("/v1/topology/history", get(history))
        .route("/v1/topology/versions/{version}", get(version))
        .route("/v1/topology/rollback", post(rollback))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CurrentResponse {
    #[serde(flatten)]
    pub record: TopologyVersion,
    /// The snapshot version being distributed.
    pub snapshot_version: u64,
}

async fn current(State(st): State<AdminState>, _: Query<NoQuery>) -> Result<Response, ApiError> {
    let cur = st.ctl.current();
    held_json(&CurrentResponse {
        record: cur.record.clone(),
        snapshot_version: st.ctl.published().version,
    })
}

/// The query of `GET /v1/topology/history`. An unknown parameter is refused (400, naming it):
/// a misspelt `limit` would list another number of versions than asked.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    #[serde(default, deserialize_with = "capped_limit")]
    pub limit: Option<usize>,
    /// Only versions older than this one: the next page, from the oldest version listed.
    pub before: Option<u64>,
}

/// `limit`: a decimal number; one too large for a `usize` is as large as one can be (capped
/// with the rest: it was refused 400, where the documentation says a limit over the maximum
/// counts as the maximum).
fn capped_limit<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    crate::admin::capped_count(d, "versions")
}

/// One history row: the version's metadata ([`VersionMeta`]), never its text.
#[derive(Debug, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub version: u64,
    pub author: String,
    pub time_unix_ms: u64,
    pub message: String,
    pub origin: Origin,
    pub current: bool,
    /// Size of the text in bytes.
    pub bytes: u64,
    /// SHA-256 of the text (hex); empty from a controller older than this field.
    #[serde(default)]
    pub sha256: String,
}

/// Most rows one history request returns.
pub const MAX_HISTORY_LIMIT: usize = 10_000;

async fn history(
    State(st): State<AdminState>,
    Query(q): Query<HistoryQuery>,
) -> Result<Response, ApiError> {
    let limit = super::page_limit(q.limit, "versions", MAX_HISTORY_LIMIT)?.unwrap_or(50);
    let ctl = st.ctl.clone();
    // The current version from the same read as the rows: read from memory before it, an
    // apply committed in between was listed but not flagged, and the version before it was.
    let before = q.before;
    let (cur, rows) = off_workers(move || ctl.history_with_current(limit, before)).await?;
    held_json(
        &rows
            .into_iter()
            .map(|r: VersionMeta| HistoryEntry {
                version: r.version,
                current: Some(r.version) == cur,
                bytes: r.bytes,
                author: r.author,
                time_unix_ms: r.time_unix_ms,
                message: r.message,
                origin: r.origin,
                sha256: r.sha256,
            })
            .collect::<Vec<_>>(),
    )
}

async fn version(
    State(st): State<AdminState>,
    _: Query<NoQuery>,
    Path(v): Path<String>,
) -> Result<Response, ApiError> {
    // Read here, not by axum's `Path<u64>`, whose refusal ("Cannot parse `x` to a `u64`")
    // names neither the parameter nor what it takes.
    let v: u64 = match v.parse() {
        Ok(n) => n,
        Err(_) => {
            return Err(ApiError::new(
                axum::http::StatusCode::BAD_REQUEST,
                format!(
                    "path parameter `version`: {:?} is not a version number (a whole number, \
                     as `tasman topology history` lists them)",
                    crate::controller::records::clipped(&v, 64)
                ),
            ));
        }
    };
    let ctl = st.ctl.clone();
    let record = off_workers(move || ctl.version(v)).await?.ok_or_else(|| {
        ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            format!("no topology version {v}"),
        )
    })?;
    held_json(&record)
}

/// The body of `POST /v1/topology`. An unknown field is refused (422, naming it): a misspelt
/// `dry_run` would apply for real, a misspelt `base_version` drop `edit`'s guard.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyRequest {
    pub text: String,
    #[serde(default)]
    pub dry_run: bool,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub author: String,
    /// Refuse unless this is still the current version (optimistic concurrency: `edit`, and
    /// `apply --base-version`).
    #[serde(default)]
    pub base_version: Option<u64>,
}

async fn apply(
    State(st): State<AdminState>,
    _: Query<NoQuery>,
    Json(req): Json<ApplyRequest>,
) -> Result<Json<ApplyOutcome>, ApiError> {
    let out = st
        .ctl
        .apply(
            &req.text,
            &actor(&req.author),
            &req.message,
            Origin::Apply,
            req.dry_run,
            req.base_version,
        )
        .await?;
    circuits_after(&st, &out).await;
    Ok(Json(out))
}

/// Circuits whose path the applied topology breaks become `failed` (the plan flagged them).
/// When that fails, the circuits' settle loop retries it.
async fn circuits_after(st: &AdminState, out: &ApplyOutcome) {
    if let Some(v) = out.version
        && let Err(e) = st.circuits.on_topology_applied().await
    {
        tracing::error!("circuits after topology version {v}: {e} (retried by the settle loop)");
    }
}

/// The body of `POST /v1/topology/rollback`; an unknown field is refused, as an apply's.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    pub version: u64,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub author: String,
    #[serde(default)]
    pub dry_run: bool,
    /// Refuse unless this is still the current version (as an apply's). Left out when None: a
    /// controller older than the field refuses it as unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_version: Option<u64>,
}

async fn rollback(
    State(st): State<AdminState>,
    _: Query<NoQuery>,
    Json(req): Json<RollbackRequest>,
) -> Result<Json<ApplyOutcome>, ApiError> {
    let out = st
        .ctl
        .rollback(
            req.version,
            &actor(&req.author),
            &req.message,
            req.dry_run,
            req.base_version,
        )
        .await?;
    circuits_after(&st, &out).await;
    Ok(Json(out))
}
