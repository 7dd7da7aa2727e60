//! Circuit routes of the admin API (behind the same bearer token as every admin route).
//!
//! | method | path | |
//! |---|---|---|
//! | POST | /v1/circuits/validate | admission only: `CircuitSpec` -> `Admission` |
//! | POST | /v1/circuits | create: `{spec, idempotency_key, author}` -> `CreateResponse` |
//! | GET | /v1/circuits | all circuits (the live table: not the archived ones); `?limit=N&after=ID` pages |
//! | GET | /v1/archived-circuits | the circuits archived after the retention period (`Archived`); pages too |
//! | GET | /v1/circuits/headroom | per-link capacity, reserved, free |
//! | GET | /v1/circuits/{id} | one circuit (id or name); 410 Gone, naming when, for an archived id |
//! | GET | /v1/circuits/{id}/history | its audit trail (an archived circuit's too, by id) |
//! | POST | /v1/circuits/{id}/resize | `{rate, author}` |
//! | POST | /v1/circuits/{id}/delete | `{author}` |
//!
//! None but the two lists takes a query parameter: one is refused (400, naming it; [`NoQuery`]).
//!
//! A request naming what the topology does not have (an edge, a service, a pool) or that is
//! malformed is refused with 422; one the fabric's state refuses (no path with room, no pool or
//! no free VIP, a used idempotency key) with 409. The CLI exits 1 for either.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use topology::Bandwidth;
use topology::circuit::LinkHeadroom;

use super::service::ServiceError;
use super::{Admission, Circuit, CircuitError, CircuitSpec, HistoryEntry};
use crate::admin::{AdminState, ApiError, NoQuery, held_json, off_workers};
use crate::controller::records::{MAX_META_FIELD, clipped};

pub fn routes() -> axum::Router<AdminState> {
    axum::Router::new()
        .route("/v1/circuits", get(list).post(create))
        .route("/v1/archived-circuits", get(list_archived))
        .route("/v1/circuits/validate", post(validate))
        .route("/v1/circuits/headroom", get(headroom))
        .route("/v1/circuits/{id}", get(show))
        .route("/v1/circuits/{id}/history", get(history))
        .route("/v1/circuits/{id}/resize", post(resize))
        .route("/v1/circuits/{id}/delete", post(delete))
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        let status = match &e {
            ServiceError::Circuit(CircuitError::Invalid(_)) => StatusCode::UNPROCESSABLE_ENTITY,
            ServiceError::Circuit(CircuitError::Placement(p)) => match p {
                topology::circuit::PlacementError::UnknownEdge { .. }
                | topology::circuit::PlacementError::NotAnEdge { .. }
                | topology::circuit::PlacementError::UnknownService { .. }
                | topology::circuit::PlacementError::SiteDoesNotServe { .. }
                | topology::circuit::PlacementError::PinnedOutsideRegions { .. } => {
                    StatusCode::UNPROCESSABLE_ENTITY
                }
                _ => StatusCode::CONFLICT,
            },
            // A pool the topology does not have, or one of the other family than the prefix, is
            // a mistake in the request, as an unknown edge or service is; no pools (of the
            // prefix's family), or none with an address free, is the fabric's state.
            ServiceError::Circuit(CircuitError::Pool(p)) => match p.in_request() {
                true => StatusCode::UNPROCESSABLE_ENTITY,
                false => StatusCode::CONFLICT,
            },
            // The fabric's state, as a pool with no address free is.
            ServiceError::Circuit(CircuitError::Conflict(_) | CircuitError::TooLarge { .. }) => {
                StatusCode::CONFLICT
            }
            ServiceError::Circuit(CircuitError::NotFound(_)) => StatusCode::NOT_FOUND,
            // Known, and gone for good: not a typo to correct.
            ServiceError::Circuit(CircuitError::Archived { .. }) => StatusCode::GONE,
            ServiceError::Circuit(CircuitError::Store(_) | CircuitError::Internal(_))
            | ServiceError::Controller(_)
            | ServiceError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ServiceError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::new(status, e.to_string())
    }
}

/// Who made a change, for the circuit's record, its history and the audit log: `unknown` when
/// blank, else at most [`MAX_META_FIELD`] bytes of the operator's text (free-form within the
/// body limit, and read back by every listing of circuits).
pub(crate) fn actor(a: &str) -> String {
    let a = a.trim();
    if a.is_empty() {
        "unknown".to_string()
    } else {
        clipped(a, MAX_META_FIELD)
    }
}

async fn validate(
    State(st): State<AdminState>,
    _: Query<NoQuery>,
    Json(spec): Json<CircuitSpec>,
) -> Result<Json<Admission>, ApiError> {
    let svc = st.circuits.clone();
    Ok(Json(off_workers(move || svc.validate(&spec)).await?))
}

/// The body of a create. Like every request body of these routes (and its `spec`), an unknown
/// field is refused (422, naming it) rather than ignored.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    pub spec: CircuitSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    #[serde(default)]
    pub author: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CreateResponse {
    pub circuit: Circuit,
    /// False when an earlier create with the same idempotency key made it.
    pub created: bool,
}

async fn create(
    State(st): State<AdminState>,
    _: Query<NoQuery>,
    Json(req): Json<CreateRequest>,
) -> Result<Json<CreateResponse>, ApiError> {
    let (circuit, created) = st
        .circuits
        .create(req.spec, req.idempotency_key, actor(&req.author))
        .await?;
    Ok(Json(CreateResponse { circuit, created }))
}

/// The query of the two lists: a page. Without `limit` the whole table is one answer (as
/// before pages), if it has at most [`MAX_PAGE`] circuits (refused, 400, beyond); with it, at most `limit` circuits (capped at [`MAX_PAGE`]) whose ids come after
/// `after`, in id order (of the ids as strings). A page shorter than its limit is the last. An unknown parameter is
/// refused (400, naming it).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    #[serde(default, deserialize_with = "page_limit")]
    pub limit: Option<usize>,
    /// The id of the last circuit of the page before.
    pub after: Option<String>,
}

/// Most circuits one page holds: a circuit's record is at most a few KiB, so a page stays well
/// under the CLI's answer limit (64 MiB).
pub const MAX_PAGE: usize = 1_000;

fn page_limit<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    crate::admin::capped_count(d, "circuits")
}

impl PageQuery {
    /// The page's bounds ([`crate::admin::page_limit`]): how many to read, and whether the
    /// answer is the whole table (no `limit`), read one past [`MAX_PAGE`] to tell one too long
    /// for a single answer ([`whole_or_refused`]).
    fn bounds(self) -> Result<(Option<String>, usize, bool), ApiError> {
        let limit = crate::admin::page_limit(self.limit, "circuits", MAX_PAGE)?;
        Ok(match limit {
            Some(l) => (self.after, l, false),
            None => (self.after, MAX_PAGE + 1, true),
        })
    }
}

/// A list asked for whole (no `limit`): answered if it has at most `max` circuits, else
/// refused (400) with the way to page through it. (The whole table was read, decoded and
/// encoded before the answers' budget was asked: a large archive, which only grows, cost
/// gigabytes per call to any holder of the read-only token.)
fn whole_or_refused<T>(rows: Vec<T>, whole: bool, max: usize) -> Result<Vec<T>, ApiError> {
    if whole && rows.len() > max {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "the list has more than {max} circuits, too many for one answer: read it in \
                 pages with `?limit={max}&after=ID` (the id of the last circuit of the page \
                 before), as `tasman circuit list` does"
            ),
        ));
    }
    Ok(rows)
}

async fn list(
    State(st): State<AdminState>,
    Query(q): Query<PageQuery>,
) -> Result<Response, ApiError> {
    let (after, limit, whole) = q.bounds()?;
    let svc = st.circuits.clone();
    let rows = off_workers(move || svc.list_page(after.as_deref(), limit)).await?;
    held_json(&whole_or_refused(rows, whole, MAX_PAGE)?)
}

async fn list_archived(
    State(st): State<AdminState>,
    Query(q): Query<PageQuery>,
) -> Result<Response, ApiError> {
    let (after, limit, whole) = q.bounds()?;
    let svc = st.circuits.clone();
    let rows = off_workers(move || svc.list_archived_page(after.as_deref(), limit)).await?;
    held_json(&whole_or_refused(rows, whole, MAX_PAGE)?)
}

#[derive(Debug, Serialize, Deserialize)]
pub struct HeadroomRow {
    pub link: topology::LinkId,
    #[serde(flatten)]
    pub headroom: LinkHeadroom,
}

async fn headroom(State(st): State<AdminState>, _: Query<NoQuery>) -> Result<Response, ApiError> {
    let svc = st.circuits.clone();
    held_json(
        &off_workers(move || svc.headroom())
            .await?
            .into_iter()
            .map(|(link, headroom)| HeadroomRow { link, headroom })
            .collect::<Vec<_>>(),
    )
}

async fn show(
    State(st): State<AdminState>,
    _: Query<NoQuery>,
    Path(id): Path<String>,
) -> Result<Json<Circuit>, ApiError> {
    let svc = st.circuits.clone();
    Ok(Json(off_workers(move || svc.get(&id)).await?))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct HistoryResponse {
    pub circuit: Circuit,
    pub history: Vec<HistoryEntry>,
    /// When the circuit was archived (its history is kept; it is found by id then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archived_unix_ms: Option<u64>,
}

async fn history(
    State(st): State<AdminState>,
    _: Query<NoQuery>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let svc = st.circuits.clone();
    held_json(&off_workers(move || svc.history_with_archive(&id)).await?)
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResizeRequest {
    pub rate: Bandwidth,
    #[serde(default)]
    pub author: String,
}

async fn resize(
    State(st): State<AdminState>,
    _: Query<NoQuery>,
    Path(id): Path<String>,
    Json(req): Json<ResizeRequest>,
) -> Result<Json<Circuit>, ApiError> {
    Ok(Json(
        st.circuits.resize(id, req.rate, actor(&req.author)).await?,
    ))
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteRequest {
    #[serde(default)]
    pub author: String,
}

async fn delete(
    State(st): State<AdminState>,
    _: Query<NoQuery>,
    Path(id): Path<String>,
    Json(req): Json<DeleteRequest>,
) -> Result<Json<Circuit>, ApiError> {
    Ok(Json(st.circuits.delete(id, actor(&req.author)).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A list asked for whole is answered up to its bound and refused past it, with the way to
    /// page through it; a page is never refused for its length.
    #[test]
    fn a_whole_list_past_its_bound_is_refused_with_the_way_to_page() {
        assert_eq!(whole_or_refused(vec![1, 2], true, 2).unwrap(), [1, 2]);
        let e = whole_or_refused(vec![1, 2, 3], true, 2).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.error.contains("more than 2 circuits") && e.error.contains("?limit=2&after=ID"));
        assert_eq!(
            whole_or_refused(vec![1, 2, 3], false, 2).unwrap(),
            [1, 2, 3]
        );
        let q = |limit| PageQuery { limit, after: None };
        assert_eq!(q(None).bounds().unwrap(), (None, MAX_PAGE + 1, true));
        assert_eq!(q(Some(5)).bounds().unwrap(), (None, 5, false));
        assert_eq!(q(Some(5_000)).bounds().unwrap(), (None, MAX_PAGE, false));
    }
}
