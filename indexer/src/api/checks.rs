//! Checkers: registration (every checker waits for the operator's approval), check
//! assignments on nodes' free capacity, and the checkers' signed reports, which decide
//! each node's verdict.
//!
//! * A checker registers its ed25519 key like a node (the registration is signed by the
//!   key it registers) and signs every later request with it; the operator approves it
//!   (`POST /api/v1/checkers/{id}/approve`).
//! * `POST /api/v1/checkers/{id}/checks` hands it the node most overdue for a check: a
//!   ready (or suspect) node with a free seat, whose next check time has come and that no
//!   other check holds. The indexer opens a session for the check on that seat (so the
//!   node's players are never disturbed) and mints a `checker` token: the relay admits it
//!   as that session's player. The node's next check is then set one interval away,
//!   spread ±25 % so that checks of many nodes do not bunch up.
//! * Each assignment carries the metering audit: the sessions the node's last heartbeat
//!   claimed against the sessions the indexer knows on it (which end when the relay stops
//!   seeing their player). A session that never existed, or had ended well before the
//!   node claimed it, is a phantom: the checker fails the node for it.
//! * `POST /api/v1/checks/{id}/report` takes the outcome, signed by the checker the check
//!   was handed to, once, before its deadline. The node's verdict follows the majority of
//!   the latest report of each checker that reported on it within two intervals (one
//!   checker: its report; 2N+1 checkers: N+1 agree; a tie decides nothing). A failure
//!   makes a node `suspect` (no new players, checked again at once); another while suspect
//!   makes it `failed` (excluded until the operator approves it again); a pass makes it
//!   `passing`.
//!
//! The verdict rules are pure functions ([`majority`], [`next_verdict`], [`score`],
//! [`pick_due`]), tested here; the handlers only read and write the store around them.

use super::*;
use crate::store::Verdict as StoredVerdict;
use pylon_indexer_client::api::MeteringAudit;
use sqlx::Row;

/// How many recent reports a node's score counts.
pub const SCORE_WINDOW: usize = 20;
/// Seconds a checker has to report after the check is handed out.
pub const REPORT_WITHIN_SECS: i64 = 300;
/// A session that ended this long before a node's heartbeat still listed it is a
/// phantom (heartbeats come every 3 s; the slack covers one in flight and clock steps).
pub const ENDED_SLACK_SECS: i64 = 10;

/// A checker as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct CheckerRecord {
    /// Checker id.
    pub id: String,
    /// Who runs it.
    pub owner: String,
    /// Base64 ed25519 public key.
    pub public_key: String,
    /// Approved by the operator.
    pub approved: bool,
    /// Revoked by the operator.
    pub revoked: bool,
    /// Last request, Unix seconds.
    pub last_seen: i64,
}

/// A checker's registration as answered.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CheckerStatus {
    /// The stored record.
    #[serde(flatten)]
    pub checker: CheckerRecord,
    /// `pending` until the operator approves it, then `ready`; or `revoked`.
    pub state: MemberState,
}

fn checker_state(c: &CheckerRecord) -> MemberState {
    if c.revoked {
        MemberState::Revoked
    } else if !c.approved {
        MemberState::Pending
    } else {
        MemberState::Ready
    }
}

/// One check as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckRecord {
    /// Check id (hex).
    pub id: String,
    /// The checker it was handed to.
    pub checker: String,
    /// The node under check.
    pub node: String,
    /// The session opened for it.
    pub session: String,
    /// Handed out, Unix seconds.
    pub issued_at: i64,
    /// Reports after this are refused.
    pub report_by: i64,
    /// Reported, Unix seconds.
    pub reported_at: Option<i64>,
}

/// One accepted report, as the verdict and score read it.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Who reported.
    pub checker: String,
    /// When.
    pub at: i64,
    /// What it measured.
    pub outcome: CheckOutcome,
}

/// The decision of the reports on one node (newest first): the majority of the latest
/// report of each distinct checker; `None` when there is none or a tie.
pub fn majority(reports: &[Report]) -> Option<bool> {
    let mut seen = std::collections::BTreeSet::new();
    let (mut pass, mut fail) = (0u32, 0u32);
    for r in reports {
        if seen.insert(r.checker.as_str()) {
            if r.outcome.passed {
                pass += 1;
            } else {
                fail += 1;
            }
        }
    }
    match pass.cmp(&fail) {
        std::cmp::Ordering::Greater => Some(true),
        std::cmp::Ordering::Less => Some(false),
        std::cmp::Ordering::Equal => None,
    }
}

/// Whether checker `me` must leave node to another checker: the node is suspect on `me`'s
/// own report (`last_reporter`). Asked only while another approved checker is active, so a
/// checker cannot confirm its own accusation when someone else can look: one lying (or
/// broken) checker cannot take an honest node from `suspect` to `failed` alone.
pub fn leave_to_another(verdict: StoredVerdict, last_reporter: Option<&str>, me: &str) -> bool {
    verdict == StoredVerdict::Suspect && last_reporter == Some(me)
}

/// A node's verdict after a decided check: a pass clears suspicion; a failure makes a node
/// suspect, and a suspect one failed. Failed stays failed (only the operator clears it).
pub fn next_verdict(current: StoredVerdict, passed: bool) -> StoredVerdict {
    match (current, passed) {
        (StoredVerdict::Failed, _) => StoredVerdict::Failed,
        (_, true) => StoredVerdict::Passing,
        (StoredVerdict::Suspect, false) => StoredVerdict::Failed,
        (_, false) => StoredVerdict::Suspect,
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

/// A node's score from its reports (newest first; the first [`SCORE_WINDOW`] count).
pub fn score(verdict: StoredVerdict, reports: &[Report]) -> NodeScore {
    let recent = &reports[..reports.len().min(SCORE_WINDOW)];
    let passed = recent.iter().filter(|r| r.outcome.passed).count() as u32;
    NodeScore {
        verdict,
        checks: recent.len() as u32,
        passed,
        pass_rate: (!recent.is_empty()).then(|| f64::from(passed) / recent.len() as f64),
        fps: median(recent.iter().filter(|r| r.outcome.frames > 0).map(|r| r.outcome.fps).collect()),
        click_to_photon_p50_ms: median(recent.iter().filter_map(|r| r.outcome.click_to_photon_p50_ms).collect()),
        capacity_gops: median(recent.iter().filter_map(|r| r.outcome.capacity_gops).collect()),
        last_checked: recent.first().map(|r| r.at),
    }
}

/// A node as the scheduler sees it.
#[derive(Debug, Clone, Copy)]
pub struct Due<'a> {
    /// The node.
    pub node: &'a NodeRecord,
    /// When its next check is due.
    pub next_check: i64,
    /// A check handed out and not yet reported (nor past its deadline) holds it.
    pub held: bool,
}

/// The node to check next at `now`: ready or suspect, with a free seat (checks use free
/// capacity only), due, not held by another check; the most overdue first. Seats are the
/// indexer's own bookings: a node cannot dodge its checks by reporting itself full (every
/// real session holds a seat; what the node reports beyond them is what the metering
/// audit looks for).
pub fn pick_due<'a>(nodes: &[Due<'a>], now: i64) -> Option<&'a NodeRecord> {
    nodes
        .iter()
        .filter(|d| {
            matches!(node_state(d.node, now), MemberState::Ready | MemberState::Suspect)
                && d.node.seats < d.node.capacity
                && d.next_check <= now
                && !d.held
        })
        .min_by(|a, b| a.next_check.cmp(&b.next_check).then_with(|| a.node.id.cmp(&b.node.id)))
        .map(|d| d.node)
}

/// The title a check plays: one of the node's, drawn by `random` among those whose
/// answer to input a checker can judge (the demo, and studio titles with a probe), or
/// among all of them when none can be. Drawn, not fixed, so that a node cannot be honest
/// in the one title it knows will be checked.
pub fn pick_title<'a>(offered: &[&'a Title], demo: &str, random: u32) -> Option<&'a Title> {
    let judged: Vec<&Title> = offered.iter().copied().filter(|t| t.id == demo || t.probe.is_some()).collect();
    let from = if judged.is_empty() { offered } else { &judged };
    from.get(usize::try_from(random).unwrap_or(0) % from.len().max(1)).copied()
}

/// `interval` spread ±25 % by `random` (any u32).
pub fn spread(interval: i64, random: u32) -> i64 {
    let quarter = interval / 4;
    interval - quarter + (i64::from(random) % (2 * quarter + 1))
}

impl Store {
    /// Registers checker `c` (always pending approval) or updates what its key's holder
    /// may change; `false` if the id has another key or the nonce is not newer.
    pub async fn register_checker(&self, c: &CheckerRecord, nonce: i64) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO checkers (id, owner, public_key, approved, revoked, last_nonce, last_seen) \
             VALUES ($1, $2, $3, 0, 0, $4, $5) \
             ON CONFLICT (id) DO UPDATE SET owner = excluded.owner, last_seen = excluded.last_seen, \
             last_nonce = excluded.last_nonce \
             WHERE checkers.public_key = excluded.public_key AND checkers.last_nonce < excluded.last_nonce",
        )
        .bind(&c.id)
        .bind(&c.owner)
        .bind(&c.public_key)
        .bind(nonce)
        .bind(c.last_seen)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// One checker.
    pub async fn checker(&self, id: &str) -> Result<Option<CheckerRecord>, StoreError> {
        let row = sqlx::query("SELECT id, owner, public_key, approved, revoked, last_seen FROM checkers WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            Ok(CheckerRecord {
                id: r.try_get(0)?,
                owner: r.try_get(1)?,
                public_key: r.try_get(2)?,
                approved: r.try_get::<i64, _>(3)? != 0,
                revoked: r.try_get::<i64, _>(4)? != 0,
                last_seen: r.try_get(5)?,
            })
        })
        .transpose()
    }

    /// Every node's next check time, and whether a check holds it at `now`.
    pub async fn check_schedule(&self, now: i64) -> Result<BTreeMap<String, (i64, bool)>, StoreError> {
        let mut out = BTreeMap::new();
        for r in sqlx::query("SELECT id, next_check FROM nodes").fetch_all(&self.pool).await? {
            out.insert(r.try_get::<String, _>(0)?, (r.try_get::<i64, _>(1)?, false));
        }
        let held = sqlx::query("SELECT node FROM checks WHERE reported_at IS NULL AND report_by >= $1")
            .bind(now)
            .fetch_all(&self.pool)
            .await?;
        for r in held {
            if let Some(e) = out.get_mut(&r.try_get::<String, _>(0)?) {
                e.1 = true;
            }
        }
        Ok(out)
    }

    /// Takes node `node` for a check: moves its next check from `seen` (what the caller
    /// read) to `next`. `false`: another checker took it meanwhile (through this replica or
    /// another: the database decides, so two checks are never handed out for one turn).
    pub async fn claim_check(&self, node: &str, seen: i64, next: i64) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE nodes SET next_check = $1 WHERE id = $2 AND next_check = $3")
            .bind(next)
            .bind(node)
            .bind(seen)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records a check handed out (its node claimed with [`Store::claim_check`]).
    pub async fn add_check(&self, c: &CheckRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO checks (id, checker, node, session, issued_at, report_by) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&c.id)
        .bind(&c.checker)
        .bind(&c.node)
        .bind(&c.session)
        .bind(c.issued_at)
        .bind(c.report_by)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// One check.
    pub async fn check(&self, id: &str) -> Result<Option<CheckRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT id, checker, node, session, issued_at, report_by, reported_at FROM checks WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(CheckRecord {
                id: r.try_get(0)?,
                checker: r.try_get(1)?,
                node: r.try_get(2)?,
                session: r.try_get(3)?,
                issued_at: r.try_get(4)?,
                report_by: r.try_get(5)?,
                reported_at: r.try_get(6)?,
            })
        })
        .transpose()
    }

    /// Records check `id`'s outcome at `now`, once and before its deadline (one
    /// statement, so two copies cannot both count); whether it was recorded.
    pub async fn record_report(&self, id: &str, outcome: &CheckOutcome, now: i64) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE checks SET reported_at = $1, passed = $2, outcome = $3 \
             WHERE id = $4 AND reported_at IS NULL AND report_by >= $1",
        )
        .bind(now)
        .bind(i64::from(outcome.passed))
        .bind(serde_json::to_string(outcome)?)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Reports on `node` since `since`, newest first, at most `limit`.
    pub async fn reports(&self, node: &str, since: i64, limit: usize) -> Result<Vec<Report>, StoreError> {
        let rows = sqlx::query(
            "SELECT checker, reported_at, outcome FROM checks WHERE node = $1 AND reported_at >= $2 \
             ORDER BY reported_at DESC, id LIMIT $3",
        )
        .bind(node)
        .bind(since)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let outcome: String = r.try_get(2)?;
                Ok(Report { checker: r.try_get(0)?, at: r.try_get(1)?, outcome: serde_json::from_str(&outcome)? })
            })
            .collect()
    }

    /// The scores of `nodes` (their verdict left at the default: the caller has it).
    pub async fn scores(&self, nodes: &[String]) -> Result<BTreeMap<String, NodeScore>, StoreError> {
        let mut out = BTreeMap::new();
        for id in nodes {
            let reports = self.reports(id, 0, SCORE_WINDOW).await?;
            if !reports.is_empty() {
                out.insert(id.clone(), score(StoredVerdict::Unchecked, &reports));
            }
        }
        Ok(out)
    }

    /// Sets a node's verdict and, if given, its next check time.
    pub async fn set_verdict(
        &self,
        node: &str,
        verdict: StoredVerdict,
        next_check: Option<i64>,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE nodes SET verdict = $1, next_check = COALESCE($2, next_check) WHERE id = $3")
            .bind(verdict.as_str())
            .bind(next_check)
            .bind(node)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The metering audit of `node`: the sessions its last heartbeat claimed that never
    /// existed on it, or had ended more than [`ENDED_SLACK_SECS`] before that heartbeat.
    pub async fn metering_audit(&self, node: &str) -> Result<MeteringAudit, StoreError> {
        let Some(row) = sqlx::query("SELECT running, last_heartbeat FROM nodes WHERE id = $1")
            .bind(node)
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(MeteringAudit::default());
        };
        let running: Vec<String> = serde_json::from_str(&row.try_get::<String, _>(0)?)?;
        let heartbeat: i64 = row.try_get(1)?;
        let mut phantom = Vec::new();
        for id in &running {
            let ended = sqlx::query("SELECT ended_at FROM sessions WHERE id = $1 AND node = $2")
                .bind(id)
                .bind(node)
                .fetch_optional(&self.pool)
                .await?;
            let ghost = match ended {
                None => true,
                Some(r) => r.try_get::<Option<i64>, _>(0)?.is_some_and(|t| t < heartbeat - ENDED_SLACK_SECS),
            };
            if ghost {
                phantom.push(id.clone());
            }
        }
        Ok(MeteringAudit { claimed: u32::try_from(running.len()).unwrap_or(u32::MAX), phantom })
    }

    /// Marks checker `id` seen at `now`.
    pub async fn checker_seen(&self, id: &str, now: i64) -> Result<(), StoreError> {
        sqlx::query("UPDATE checkers SET last_seen = $1 WHERE id = $2").bind(now).bind(id).execute(&self.pool).await?;
        Ok(())
    }

    /// Whether an approved, unrevoked checker other than `me` was seen since `since`.
    pub async fn another_checker_active(&self, me: &str, since: i64) -> Result<bool, StoreError> {
        let row = sqlx::query(
            "SELECT COUNT(*) FROM checkers WHERE id <> $1 AND approved <> 0 AND revoked = 0 AND last_seen >= $2",
        )
        .bind(me)
        .bind(since)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get::<i64, _>(0)? > 0)
    }

    /// The checker of each suspect node's latest report (only a suspicion waits for
    /// another checker: [`leave_to_another`]).
    pub async fn last_reporters(&self) -> Result<BTreeMap<String, String>, StoreError> {
        let rows = sqlx::query(
            "SELECT c.node, c.checker FROM checks c \
             WHERE c.node IN (SELECT id FROM nodes WHERE verdict = $1) \
             AND c.reported_at = (SELECT MAX(l.reported_at) FROM checks l WHERE l.node = c.node)",
        )
        .bind(StoredVerdict::Suspect.as_str())
        .fetch_all(&self.pool)
        .await?;
        let mut out = BTreeMap::new();
        for r in rows {
            out.insert(r.try_get::<String, _>(0)?, r.try_get::<String, _>(1)?);
        }
        Ok(out)
    }
}

/// Registers a checker (signed by the key it registers). A new checker is `pending` until
/// the operator approves it.
#[utoipa::path(post, path = "/api/v1/checkers", tag = "checks", request_body = RegisterChecker,
    security(("pylon_signature" = [], "pylon_timestamp" = [], "pylon_nonce" = [])),
    responses(
        (status = 200, description = "Registered; its state (`pending` until approved)", body = CheckerStatus),
        (status = 400, description = "Malformed or invalid registration", body = ErrorBody),
        (status = 401, description = "Not signed by the key it registers, stale or replayed", body = ErrorBody),
        (status = 403, description = "This checker is revoked", body = ErrorBody),
        (status = 409, description = "The id is registered with another key", body = ErrorBody),
    ))]
pub(super) async fn register_checker(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<CheckerStatus>> {
    let r: RegisterChecker = json(&body)?;
    decode_key(&r.public_key)?;
    if !valid_id(&r.id) || r.owner.len() > 256 {
        return Err(ApiError::invalid("a checker needs an id of 1-64 letters, digits or ._:- and an owner"));
    }
    let req = SignedRequest { method: &Method::POST, path: "/api/v1/checkers", headers: &headers, body: &body };
    let nonce = verify_signed(&s, req, &r.public_key)?;
    if let Some(old) = s.store.checker(&r.id).await? {
        may_register_again(&s, "checker", &old.public_key, old.revoked, &r.public_key)?;
    }
    let record = CheckerRecord {
        id: r.id.clone(),
        owner: r.owner,
        public_key: r.public_key,
        approved: false,
        revoked: false,
        last_seen: unix_now(),
    };
    if !s.store.register_checker(&record, nonce).await? {
        s.metrics.refused_requests.inc();
        return Err(replayed("registration"));
    }
    let checker = s.store.checker(&r.id).await?.ok_or_else(ApiError::internal)?;
    let state = checker_state(&checker);
    if state == MemberState::Pending {
        tracing::info!(checker = %r.id, "checker registered; waiting for approval (POST /api/v1/checkers/{}/approve)", r.id);
    }
    Ok(Json(CheckerStatus { checker, state }))
}

/// The operator approves a checker: only approved checkers get checks.
#[utoipa::path(post, path = "/api/v1/checkers/{id}/approve", tag = "checks", security(("admin" = [])),
    params(("id" = String, Path, description = "Checker id")),
    responses(
        (status = 204, description = "Approved"),
        (status = 401, description = "No or wrong admin token", body = ErrorBody),
        (status = 404, description = "No such checker", body = ErrorBody),
    ))]
pub(super) async fn approve_checker(
    State(s): State<AppState>,
    IdPath(id): IdPath,
    headers: HeaderMap,
) -> ApiResult<StatusCode> {
    admin_member(&s, &headers, Member::Checker, &id, AdminAction::Approve).await
}

/// The operator revokes a checker: its requests and reports are refused from now on.
#[utoipa::path(post, path = "/api/v1/checkers/{id}/revoke", tag = "checks", security(("admin" = [])),
    params(("id" = String, Path, description = "Checker id")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 401, description = "No or wrong admin token", body = ErrorBody),
        (status = 404, description = "No such checker", body = ErrorBody),
    ))]
pub(super) async fn revoke_checker(
    State(s): State<AppState>,
    IdPath(id): IdPath,
    headers: HeaderMap,
) -> ApiResult<StatusCode> {
    admin_member(&s, &headers, Member::Checker, &id, AdminAction::Revoke).await
}

/// Checker `id`, checked: the request is signed by its key and not replayed, and the
/// checker is approved and not revoked.
async fn signed_checker(
    s: &AppState,
    id: &str,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> ApiResult<CheckerRecord> {
    let checker = s.store.checker(id).await?.ok_or_else(|| ApiError::not_found("checker"))?;
    let req = SignedRequest { method: &Method::POST, path, headers, body };
    check_signature(s, Member::Checker, id, req, &checker.public_key).await?;
    match checker_state(&checker) {
        MemberState::Revoked => {
            s.metrics.refused_requests.inc();
            Err(ApiError::revoked("checker"))
        }
        MemberState::Pending => {
            s.metrics.refused_requests.inc();
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                ErrorReason::Pending,
                "this checker waits for the operator's approval",
            ))
        }
        _ => Ok(checker),
    }
}

fn random_bytes<const N: usize>() -> ApiResult<[u8; N]> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| {
        tracing::error!("no randomness: {e}");
        ApiError::internal()
    })?;
    Ok(b)
}

/// Hands checker `id` the node most overdue for a check, with a session opened for it on
/// the node's free capacity and a `checker` token; 204 while no node is due.
#[utoipa::path(post, path = "/api/v1/checkers/{id}/checks", tag = "checks",
    params(("id" = String, Path, description = "Checker id")),
    security(("pylon_signature" = [], "pylon_timestamp" = [], "pylon_nonce" = [])),
    responses(
        (status = 201, description = "A check to make now", body = CheckAssignment),
        (status = 204, description = "No node is due for a check; ask again later"),
        (status = 401, description = "Not signed by the checker's key, stale or replayed", body = ErrorBody),
        (status = 403, description = "This checker is revoked, or not approved yet", body = ErrorBody),
        (status = 404, description = "No such checker", body = ErrorBody),
    ))]
pub(super) async fn next_check(
    State(s): State<AppState>,
    IdPath(id): IdPath,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let path = format!("/api/v1/checkers/{id}/checks");
    signed_checker(&s, &id, &path, &headers, &body).await?;
    let now = unix_now();
    s.store.checker_seen(&id, now).await?;
    let nodes = s.store.nodes().await?;
    let schedule = s.store.check_schedule(now).await?;
    // A suspicion is confirmed by another checker when one is active (seen within two
    // intervals), not by the checker that raised it.
    let window = 2 * s.policy.check_interval_secs.max(1);
    let reporters = match s.store.another_checker_active(&id, now - window).await? {
        true => s.store.last_reporters().await?,
        false => BTreeMap::new(),
    };
    let relays = s.store.relays().await?;
    let titles = s.store.titles().await?;
    let due: Vec<Due<'_>> = nodes
        .iter()
        .map(|n| {
            let (next_check, held) = schedule.get(&n.id).copied().unwrap_or((0, false));
            // A node no relay carries, or with no title in the catalog, cannot be played.
            let playable = relays.iter().any(|r| relay_healthy(r, now) && r.node_rtt_ms.contains_key(&n.id))
                && n.titles.iter().any(|t| titles.iter().any(|c| &c.id == t));
            let others = leave_to_another(n.verdict, reporters.get(&n.id).map(String::as_str), &id);
            Due { node: n, next_check, held: held || !playable || others }
        })
        .collect();
    let Some(node) = pick_due(&due, now) else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    // Its next check as read: the claim below succeeds only if nobody moved it since.
    let seen = schedule.get(&node.id).map_or(0, |v| v.0);
    let demo = Title::builtin_demo().id;
    let offered: Vec<&Title> = titles.iter().filter(|t| node.titles.contains(&t.id)).collect();
    let title = pick_title(&offered, &demo, u32::from_le_bytes(random_bytes()?)).ok_or_else(ApiError::internal)?;
    let relay = relays
        .iter()
        .filter(|r| relay_healthy(r, now))
        .filter_map(|r| r.node_rtt_ms.get(&node.id).map(|rtt| (r, *rtt)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(r, _)| r)
        .ok_or_else(ApiError::internal)?;
    let claims = Claims {
        session: random_bytes()?,
        role: Role::Checker,
        issued_at: now as u64,
        expires_at: now as u64 + TOKEN_LIFETIME_SECS,
        title: title.id.clone(),
        node: node.id.clone(),
        relay: relay.id.clone(),
    };
    let token = s.sign(&claims)?;
    let session = claims.session_hex();
    let record = SessionRecord {
        id: session.clone(),
        title: title.id.clone(),
        node: node.id.clone(),
        provider: node.provider.clone(),
        relay: relay.id.clone(),
        gpu_class: node.gpu_class,
        started_at: now,
        check: true,
    };
    let [a, b, c, d] = random_bytes()?;
    let next = now + spread(s.policy.check_interval_secs.max(1), u32::from_le_bytes([a, b, c, d]));
    if !s.store.claim_check(&node.id, seen, next).await? {
        // Another checker (through this replica or another) took this node's turn.
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    if !s.store.start_session(&record, node.capacity).await? {
        // A player took the free seat meanwhile: the player comes first, and the node's
        // turn comes back.
        s.store.claim_check(&node.id, next, seen).await?;
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let check: String = random_bytes::<16>()?.iter().map(|b| format!("{b:02x}")).collect();
    let report_by = now + REPORT_WITHIN_SECS;
    s.store
        .add_check(&CheckRecord {
            id: check.clone(),
            checker: id.clone(),
            node: node.id.clone(),
            session: session.clone(),
            issued_at: now,
            report_by,
            reported_at: None,
        })
        .await?;
    s.metrics.checks_assigned.inc();
    tracing::info!(%check, checker = %id, node = %node.id, title = %title.id, relay = %relay.id, "check assigned");
    let assignment = CheckAssignment {
        check,
        node: node.id.clone(),
        title: title.id.clone(),
        session: session.clone(),
        token,
        play_url: format!("{}/play/{session}", relay.public_url.trim_end_matches('/')),
        width: u32::try_from(title.width).unwrap_or(0),
        height: u32::try_from(title.height).unwrap_or(0),
        fps: u32::try_from(title.fps).unwrap_or(0),
        demo: title.id == demo,
        probe: title.probe.clone(),
        gpu_class: u8::try_from(node.gpu_class).unwrap_or(u8::MAX),
        report_by,
        audit: s.store.metering_audit(&node.id).await?,
    };
    Ok((StatusCode::CREATED, Json(assignment)).into_response())
}

fn valid_outcome(o: &CheckOutcome) -> bool {
    let finite = |v: f64| v.is_finite() && v >= 0.0;
    finite(o.fps)
        && finite(o.bitrate_kbps)
        && [
            o.rtt_ms,
            o.click_to_photon_p50_ms,
            o.click_to_photon_p95_ms,
            o.capacity_ms,
            o.capacity_deadline_ms,
            o.capacity_gops,
        ]
        .iter()
        .flatten()
        .all(|v| finite(*v))
        && o.failures.len() <= 32
        && o.failures.iter().all(|f| f.len() <= 512)
        // A pass with a failure listed is not a pass.
        && (!o.passed || o.failures.is_empty())
}

/// A checker's signed report of a check it was handed: once, before the deadline. The
/// node's verdict follows the majority of its checkers' latest reports.
#[utoipa::path(post, path = "/api/v1/checks/{id}/report", tag = "checks", request_body = CheckOutcome,
    params(("id" = String, Path, description = "Check id (32 hex digits)")),
    security(("pylon_signature" = [], "pylon_timestamp" = [], "pylon_nonce" = [])),
    responses(
        (status = 200, description = "Recorded; the node's score now", body = NodeScore),
        (status = 400, description = "Malformed or invalid outcome", body = ErrorBody),
        (status = 401, description = "Not signed by the key of the checker the check was handed to, stale or replayed",
            body = ErrorBody),
        (status = 403, description = "The checker is revoked", body = ErrorBody),
        (status = 404, description = "No such check", body = ErrorBody),
        (status = 409, description = "Already reported, or too late", body = ErrorBody),
    ))]
pub(super) async fn report_check(
    State(s): State<AppState>,
    IdPath(id): IdPath,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<NodeScore>> {
    let check = s.store.check(&id).await?.ok_or_else(|| ApiError::not_found("check"))?;
    // Only the checker the check was handed to can sign its report.
    let path = format!("/api/v1/checks/{id}/report");
    signed_checker(&s, &check.checker, &path, &headers, &body).await?;
    let outcome: CheckOutcome = json(&body)?;
    if !valid_outcome(&outcome) {
        return Err(ApiError::invalid(
            "an outcome's figures are finite and non-negative, with at most 32 failures, none for a pass",
        ));
    }
    let now = unix_now();
    if !s.store.record_report(&id, &outcome, now).await? {
        s.metrics.refused_requests.inc();
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            ErrorReason::Closed,
            "this check was already reported, or its time to report is over",
        ));
    }
    let result = if outcome.passed { "pass" } else { "fail" };
    s.metrics.check_reports.get_or_create(&CheckResultLabel { result }).inc();
    if s.store.end_session(&check.session, now, "check done").await? {
        s.metrics.sessions_ended.inc();
    }
    let node = s.store.node(&check.node).await?.ok_or_else(|| ApiError::not_found("node"))?;
    let window = now - 2 * s.policy.check_interval_secs.max(1);
    let recent = s.store.reports(&node.id, window, 1000).await?;
    let verdict = majority(&recent).map_or(node.verdict, |passed| next_verdict(node.verdict, passed));
    // A suspect node is checked again at once, by whichever checker asks first: the
    // suspicion is confirmed or, with several checkers, outvoted.
    let next = (verdict == StoredVerdict::Suspect).then_some(now);
    if verdict != node.verdict || next.is_some() {
        s.store.set_verdict(&node.id, verdict, next).await?;
    }
    if verdict != node.verdict {
        tracing::warn!(node = %node.id, from = node.verdict.as_str(), to = verdict.as_str(), failures = ?outcome.failures,
            "node verdict changed");
    }
    tracing::info!(%id, checker = %check.checker, node = %node.id, result, verdict = verdict.as_str(), "check reported");
    let reports = s.store.reports(&node.id, 0, SCORE_WINDOW).await?;
    Ok(Json(score(verdict, &reports)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(checker: &str, at: i64, passed: bool) -> Report {
        Report { checker: checker.into(), at, outcome: CheckOutcome { passed, ..Default::default() } }
    }

    #[test]
    fn a_check_plays_a_title_drawn_among_those_whose_answer_can_be_judged() {
        use pylon_indexer_client::api::Probe;
        let demo = Title::builtin_demo();
        let probe = Probe { setup: vec![], keys: ["ArrowLeft".into(), "ArrowRight".into()], hold_ms: 250 };
        let probed = Title { id: "game".into(), launch: "exec".into(), probe: Some(probe), ..Title::default() };
        let unprobed = Title { id: "other".into(), launch: "exec".into(), ..Title::default() };
        let drawn = |offered: &[&Title]| -> std::collections::BTreeSet<String> {
            (0..16).filter_map(|r| pick_title(offered, "demo", r)).map(|t| t.id.clone()).collect()
        };
        assert_eq!(drawn(&[&demo, &probed, &unprobed]), ["demo".to_string(), "game".into()].into());
        assert_eq!(
            drawn(&[&unprobed]),
            ["other".to_string()].into(),
            "liveness alone where nothing else can be judged"
        );
        assert_eq!(drawn(&[]), Default::default());
    }

    #[test]
    fn a_checker_leaves_the_confirmation_of_its_own_suspicion_to_another() {
        use StoredVerdict::*;
        assert!(leave_to_another(Suspect, Some("c1"), "c1"));
        assert!(!leave_to_another(Suspect, Some("c2"), "c1"), "another's suspicion: c1 may confirm it");
        assert!(!leave_to_another(Suspect, None, "c1"));
        for v in [Unchecked, Passing, Failed] {
            assert!(!leave_to_another(v, Some("c1"), "c1"), "{v:?}: only suspicion waits for another");
        }
    }

    #[test]
    fn the_latest_report_of_each_checker_votes_and_a_majority_decides() {
        assert_eq!(majority(&[]), None);
        assert_eq!(majority(&[report("a", 10, false)]), Some(false), "one checker decides alone");
        // Newest first: a's older pass does not count twice.
        let r = [report("a", 30, false), report("b", 20, true), report("a", 10, true)];
        assert_eq!(majority(&r), None, "one against one is a tie");
        let r = [report("c", 40, true), report("a", 30, false), report("b", 20, true), report("a", 10, false)];
        assert_eq!(majority(&r), Some(true), "2 of 3 (2N+1, N = 1)");
        // One lying checker repeating itself is still one vote.
        let r = [report("liar", 50, false), report("liar", 45, false), report("b", 40, true), report("c", 30, true)];
        assert_eq!(majority(&r), Some(true));
    }

    #[test]
    fn a_failure_makes_a_node_suspect_a_second_one_failed_and_only_the_operator_clears_it() {
        use StoredVerdict::*;
        assert_eq!(next_verdict(Unchecked, true), Passing);
        assert_eq!(next_verdict(Passing, false), Suspect);
        assert_eq!(next_verdict(Suspect, true), Passing);
        assert_eq!(next_verdict(Suspect, false), Failed);
        assert_eq!(next_verdict(Failed, true), Failed);
    }

    #[test]
    fn a_score_counts_recent_reports_and_takes_medians() {
        let mut reports: Vec<Report> = (0..25)
            .map(|i| {
                let mut r = report("a", 100 - i, i % 5 != 0);
                r.outcome.frames = 600;
                r.outcome.fps = 58.0 + (i % 3) as f64;
                r.outcome.click_to_photon_p50_ms = Some(40.0 + i as f64);
                r
            })
            .collect();
        reports[1].outcome.frames = 0; // nothing decoded: its fps says nothing
        reports[1].outcome.fps = 0.0;
        let s = score(StoredVerdict::Passing, &reports);
        assert_eq!((s.checks, s.passed), (20, 16));
        assert_eq!(s.pass_rate, Some(0.8));
        assert_eq!(s.fps, Some(59.0));
        assert_eq!(s.click_to_photon_p50_ms, Some(50.0));
        assert_eq!(s.last_checked, Some(100));
        assert_eq!(score(StoredVerdict::Unchecked, &[]).pass_rate, None);
    }

    fn node(id: &str, capacity: i64, seats: i64) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            provider: "p".into(),
            public_key: String::new(),
            info: serde_json::json!({}),
            capacity,
            sessions: 0,
            price_per_hour: 0.0,
            gpu_class: 1,
            encode_ms: 4.0,
            titles: vec!["demo".into()],
            draining: false,
            revoked: false,
            approved: true,
            seats,
            verdict: StoredVerdict::Unchecked,
            last_heartbeat: 1_000,
        }
    }

    #[test]
    fn checks_go_to_the_most_overdue_node_with_a_free_seat_and_never_to_a_full_one() {
        let now = 1_005;
        let full = node("full", 1, 1);
        let early = node("early", 2, 0);
        let late = node("late", 2, 1);
        let held = node("held", 2, 0);
        let mut failed = node("failed", 2, 0);
        failed.verdict = StoredVerdict::Failed;
        let mut suspect = node("suspect", 2, 0);
        suspect.verdict = StoredVerdict::Suspect;
        let due = |n: &'static NodeRecord, next_check, held| Due { node: n, next_check, held };
        let (full, early, late, held, failed, suspect) = (
            Box::leak(Box::new(full)),
            Box::leak(Box::new(early)),
            Box::leak(Box::new(late)),
            Box::leak(Box::new(held)),
            Box::leak(Box::new(failed)),
            Box::leak(Box::new(suspect)),
        );
        let nodes = [due(full, 0, false), due(early, 900, false), due(late, 1_000, false), due(held, 0, true)];
        assert_eq!(pick_due(&nodes, now).map(|n| n.id.as_str()), Some("early"), "a full node is never checked");
        assert_eq!(pick_due(&nodes[2..], now).map(|n| n.id.as_str()), Some("late"));
        assert_eq!(pick_due(&[due(late, 1_006, false)], now), None, "not due yet");
        assert_eq!(pick_due(&[due(failed, 0, false)], now), None, "failed nodes are out of the pool");
        assert_eq!(pick_due(&[due(suspect, 0, false)], now).map(|n| n.id.as_str()), Some("suspect"));
    }

    #[test]
    fn checks_spread_a_quarter_either_side_of_the_interval() {
        let all: Vec<i64> = (0..10_000u32).map(|r| spread(60, r.wrapping_mul(2_654_435_761))).collect();
        assert!(all.iter().all(|v| (45..=75).contains(v)));
        assert!(all.contains(&45) && all.contains(&75));
        assert_eq!(spread(1, 7), 1);
    }
}
