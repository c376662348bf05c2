//! The checker as a member of a pool: it registers its own ed25519 key with the indexer
//! (the operator approves it), asks for checks, plays each assigned session through its
//! relay with a `checker` token, and reports the outcome, signed, to the indexer.

use crate::metrics::{CheckerMetrics, Outcome};
use crate::{CheckConfig, CheckError, CheckReport};
use pylon_indexer_client::api::{CheckAssignment, CheckOutcome, ErrorReason, MeteringAudit, RegisterChecker};
use pylon_indexer_client::{Client, ClientError, register_until_accepted};
use std::path::PathBuf;
use std::time::Duration;

/// A checker in a pool.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// The indexer's base URL, or each of its replicas' (tried in this order).
    pub indexer: Vec<String>,
    /// This checker's id.
    pub id: String,
    /// Who runs it.
    pub owner: String,
    /// Where its key is kept (`checker-key`, created on first start).
    pub data_dir: PathBuf,
    /// Stop after this many checks (`None`: until shut down).
    pub checks: Option<u32>,
    /// How long to wait before asking again when no node is due.
    pub poll: Duration,
    /// How long to watch each node after its first frame.
    pub watch: Duration,
    /// How long the connection and first frame may take.
    pub first_frame_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("checker key: {0}")]
    Key(#[from] pylon_indexer_client::keys::KeyError),
    #[error("the indexer refused this checker for good: {0}")]
    Refused(ClientError),
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// What one check found, as reported.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Reported {
    pub assignment: CheckAssignment,
    pub outcome: CheckOutcome,
}

/// The outcome of a check as the indexer takes it: the measured figures, and every rule
/// that failed. A check that could not be made on the node's side (no first frame, the
/// stream never connected) is a failure of liveness; phantom sessions in the node's
/// metering (`audit`) fail it too.
pub fn outcome(result: &Result<CheckReport, CheckError>, audit: &MeteringAudit) -> CheckOutcome {
    let mut o = stream_outcome(result);
    if let Some(failure) = audit.failure() {
        o.failures.push(failure);
        o.passed = false;
    }
    o
}

fn stream_outcome(result: &Result<CheckReport, CheckError>) -> CheckOutcome {
    match result {
        Ok(r) => {
            let q = &r.qoe;
            // The demo's aimed turns, or a studio title's probe: the same figures.
            let resp = r.response.as_ref().map(|r| &r.answers).or(r.probe.as_ref().map(|p| &p.answers));
            let cap = r.capacity.as_ref();
            let mut failures = r.failures();
            if r.role != "player" {
                failures.push(format!("the relay admitted the checker as {}, not as the session's player", r.role));
            }
            CheckOutcome {
                passed: failures.is_empty(),
                failures,
                fps: q.fps,
                frames: q.frames_decoded,
                wrong_size: q.wrong_size,
                freezes: q.freezes,
                bitrate_kbps: q.bitrate_kbps,
                rtt_ms: q.rtt_ms,
                answered: resp.map(|r| r.answered),
                inputs: resp.map(|r| r.inputs),
                sham_fired: resp.map(|r| r.sham_fired),
                shams: resp.map(|r| r.shams),
                click_to_photon_p50_ms: resp.and_then(|r| r.p50_ms),
                click_to_photon_p95_ms: resp.and_then(|r| r.p95_ms),
                capacity_n: cap.map(|c| c.n),
                capacity_ms: cap.and_then(|c| c.answered_ms),
                capacity_deadline_ms: cap.map(|c| c.deadline_ms),
                capacity_gops: cap.and_then(|c| c.gops),
            }
        }
        Err(e) => CheckOutcome { passed: false, failures: vec![e.to_string()], ..CheckOutcome::default() },
    }
}

/// Registers, then checks whatever the indexer assigns until `config.checks` are done or
/// `shutdown` turns true; calls `on_report` with each report the indexer accepted.
pub async fn run_pool(
    config: PoolConfig,
    metrics: CheckerMetrics,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    mut on_report: impl FnMut(&Reported),
) -> Result<u32, PoolError> {
    let key = pylon_indexer_client::keys::load_or_create(&config.data_dir, "checker-key")?;
    let client = Client::with_replicas(&config.indexer, key)?;
    let registration =
        RegisterChecker { id: config.id.clone(), owner: config.owner.clone(), public_key: client.public_key() };
    match register_until_accepted(|| client.register_checker(&registration), &mut shutdown).await {
        Ok(Some(())) => {}
        Ok(None) => return Ok(0),
        Err(e) => return Err(PoolError::Refused(e)),
    }
    tracing::info!(id = %config.id, key = %client.public_key(), indexer = %client.base(), "registered");
    let mut done = 0u32;
    let mut told_pending = false;
    while config.checks.is_none_or(|n| done < n) {
        let assignment = match client.next_check(&config.id).await {
            Ok(Some(a)) => Some(a),
            Ok(None) => {
                metrics.idle_polls.inc();
                None
            }
            Err(ClientError::Refused { reason: Some(ErrorReason::Pending), .. }) => {
                if !told_pending {
                    tracing::info!(
                        "waiting for the operator's approval: POST {}/api/v1/checkers/{}/approve",
                        client.base(),
                        config.id
                    );
                    told_pending = true;
                }
                None
            }
            Err(e) if e.is_refusal() => return Err(PoolError::Refused(e)),
            Err(e) => {
                tracing::warn!("asking for a check: {e}");
                None
            }
        };
        let Some(assignment) = assignment else {
            // Nothing to check now: ask again after the poll interval.
            if wait(&mut shutdown, config.poll).await {
                break;
            }
            continue;
        };
        tracing::info!(check = %assignment.check, node = %assignment.node, title = %assignment.title, "checking");
        let check = CheckConfig {
            relay: assignment.play_url.clone(),
            token: Some(assignment.token.clone()),
            advertised: crate::Advertised { width: assignment.width, height: assignment.height, fps: assignment.fps },
            duration: config.watch,
            demo: assignment.demo,
            probe: assignment.probe.clone(),
            first_frame_timeout: config.first_frame_timeout,
            gpu_class: Some(assignment.gpu_class),
        };
        let started = std::time::Instant::now();
        let result = tokio::select! {
            r = crate::run(check) => r,
            _ = shutdown.wait_for(|s| *s) => break,
        };
        let outcome = outcome(&result, &assignment.audit);
        let reported = client.report_check(&assignment.check, &outcome).await;
        metrics.check_seconds.observe(started.elapsed().as_secs_f64());
        let result = match (&reported, outcome.passed) {
            (Err(_), _) => "unreported",
            (Ok(()), true) => "pass",
            (Ok(()), false) => "fail",
        };
        metrics.checks.get_or_create(&Outcome { result }).inc();
        match reported {
            Ok(()) => {
                tracing::info!(check = %assignment.check, node = %assignment.node, passed = outcome.passed,
                    failures = ?outcome.failures, "reported");
                done += 1;
                on_report(&Reported { assignment, outcome });
            }
            Err(e) if e.is_refusal() && !matches!(&e, ClientError::Refused { status: 409, .. }) => {
                return Err(PoolError::Refused(e));
            }
            Err(e) => tracing::warn!(check = %assignment.check, "report not taken: {e}"),
        }
    }
    Ok(done)
}

/// Sleeps `d`; `true` if `shutdown` turned true first.
async fn wait(shutdown: &mut tokio::sync::watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = shutdown.wait_for(|s| *s) => true,
    }
}
