//! Storage: SQLite by default (a file in the data directory), PostgreSQL when the URL
//! names one; the same migrations (`indexer/migrations/`) and queries run on both through
//! sqlx's `Any` driver.

use serde::{Deserialize, Serialize};
use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AnyPool, Row};
use std::collections::BTreeMap;

/// Storage errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database failed.
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// Migrations failed.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored JSON column did not parse.
    #[error("corrupt stored value: {0}")]
    Corrupt(#[from] serde_json::Error),
}

pub use pylon_indexer_client::api::{InputKind, Probe, Title, Verdict};

/// A registered render node as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct NodeRecord {
    /// Node id.
    pub id: String,
    /// Provider account.
    pub provider: String,
    /// Base64 ed25519 public key the node signs its requests with.
    pub public_key: String,
    /// Hardware and location facts (GPU model and memory, Vulkan device, encoders,
    /// region, coordinates), as the node reported them.
    #[schema(value_type = Object)]
    pub info: serde_json::Value,
    /// Sessions it can run.
    pub capacity: i64,
    /// Sessions it runs now.
    pub sessions: i64,
    /// Price per GPU-hour.
    pub price_per_hour: f64,
    /// GPU class.
    pub gpu_class: i64,
    /// Expected encode time per frame, ms.
    pub encode_ms: f64,
    /// Titles installed and ready.
    pub titles: Vec<String>,
    /// Draining: no new sessions.
    pub draining: bool,
    /// Revoked: refused everywhere.
    pub revoked: bool,
    /// Approved by the operator (always, unless the indexer runs with `--approve-new`).
    #[serde(default = "yes")]
    pub approved: bool,
    /// Seats held by matched, running sessions (what matching counts).
    #[serde(default)]
    pub seats: i64,
    /// What checkers' reports decided.
    #[serde(default)]
    pub verdict: Verdict,
    /// Last heartbeat, Unix seconds.
    pub last_heartbeat: i64,
}

fn yes() -> bool {
    true
}

/// A registered relay as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct RelayRecord {
    /// Relay id.
    pub id: String,
    /// Owner account.
    pub owner: String,
    /// Base64 ed25519 public key.
    pub public_key: String,
    /// Where browsers reach it (`http://host:8080`).
    pub public_url: String,
    /// Where nodes reach it over QUIC.
    pub quic_addr: String,
    /// Region name.
    pub region: String,
    /// Viewers it can serve.
    pub capacity: i64,
    /// Viewers now.
    pub viewers: i64,
    /// Measured RTT to nodes, ms.
    pub node_rtt_ms: BTreeMap<String, f64>,
    /// Revoked.
    pub revoked: bool,
    /// Approved by the operator (always, unless the indexer runs with `--approve-new`).
    #[serde(default = "yes")]
    pub approved: bool,
    /// Last heartbeat, Unix seconds.
    pub last_heartbeat: i64,
    /// SHA-256 of its QUIC certificate (hex; empty if it registered none).
    #[serde(default)]
    pub cert_sha256: String,
    /// Draining: its viewers are moving to other relays and it takes no new ones.
    #[serde(default)]
    pub draining: bool,
}

/// Seconds of play per provider, for payouts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Usage {
    /// Provider account.
    pub provider: String,
    /// Sessions started.
    pub sessions: i64,
    /// Seconds played (ended sessions, plus running ones up to now).
    pub seconds: i64,
}

/// Why a session ended when its render node stopped heartbeating (the player's page says
/// so and offers a new session).
pub const NODE_GONE: &str = "node gone";

/// The indexer's database.
#[derive(Debug, Clone)]
pub struct Store {
    pub(crate) pool: AnyPool,
}

fn b(v: bool) -> i64 {
    i64::from(v)
}

impl Store {
    /// Connects (creating a SQLite file if needed) and applies the migrations.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        install_default_drivers();
        // One connection for SQLite in memory, so every query sees the same database.
        let max = if url.contains(":memory:") { 1 } else { 8 };
        let sqlite = url.starts_with("sqlite:");
        let pool = AnyPoolOptions::new()
            .max_connections(max)
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if sqlite {
                        // WAL lets readers run beside the writer; NORMAL sync is still
                        // crash-safe in WAL mode; writers wait instead of failing.
                        for pragma in
                            ["PRAGMA journal_mode = WAL", "PRAGMA synchronous = NORMAL", "PRAGMA busy_timeout = 5000"]
                        {
                            sqlx::query(pragma).execute(&mut *conn).await?;
                        }
                    }
                    Ok(())
                })
            })
            .connect(url)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Self { pool })
    }

    /// Adds or replaces a title.
    pub async fn put_title(&self, t: &Title) -> Result<(), StoreError> {
        // One statement: a reader never sees the title missing while it is replaced.
        sqlx::query(
            "INSERT INTO titles (id, name, description, launch, min_gpu_class, width, height, fps, command, args, \
             workdir, env, needs_gpu, input_kinds, probe) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) ON CONFLICT (id) DO UPDATE SET \
             name = excluded.name, description = excluded.description, launch = excluded.launch, \
             min_gpu_class = excluded.min_gpu_class, width = excluded.width, height = excluded.height, \
             fps = excluded.fps, command = excluded.command, args = excluded.args, workdir = excluded.workdir, \
             env = excluded.env, needs_gpu = excluded.needs_gpu, input_kinds = excluded.input_kinds, \
             probe = excluded.probe",
        )
        .bind(&t.id)
        .bind(&t.name)
        .bind(&t.description)
        .bind(&t.launch)
        .bind(t.min_gpu_class)
        .bind(t.width)
        .bind(t.height)
        .bind(t.fps)
        .bind(&t.command)
        .bind(serde_json::to_string(&t.args)?)
        .bind(&t.workdir)
        .bind(serde_json::to_string(&t.env)?)
        .bind(b(t.needs_gpu))
        .bind(serde_json::to_string(&t.input_kinds)?)
        .bind(match &t.probe {
            Some(p) => serde_json::to_string(p)?,
            None => String::new(),
        })
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    const TITLE_COLUMNS: &'static str = "id, name, description, launch, min_gpu_class, width, height, fps, command, \
        args, workdir, env, needs_gpu, input_kinds, probe";

    fn title_row(r: &sqlx::any::AnyRow) -> Result<Title, StoreError> {
        Ok(Title {
            id: r.try_get(0)?,
            name: r.try_get(1)?,
            description: r.try_get(2)?,
            launch: r.try_get(3)?,
            min_gpu_class: r.try_get(4)?,
            width: r.try_get(5)?,
            height: r.try_get(6)?,
            fps: r.try_get(7)?,
            command: r.try_get(8)?,
            args: serde_json::from_str(&r.try_get::<String, _>(9)?)?,
            workdir: r.try_get(10)?,
            env: serde_json::from_str(&r.try_get::<String, _>(11)?)?,
            needs_gpu: r.try_get::<i64, _>(12)? != 0,
            input_kinds: serde_json::from_str(&r.try_get::<String, _>(13)?)?,
            probe: match r.try_get::<String, _>(14)? {
                p if p.is_empty() => None,
                p => Some(serde_json::from_str(&p)?),
            },
        })
    }

    /// The whole catalog, by name.
    pub async fn titles(&self) -> Result<Vec<Title>, StoreError> {
        let q = format!("SELECT {} FROM titles ORDER BY name, id", Self::TITLE_COLUMNS);
        sqlx::query(&q).fetch_all(&self.pool).await?.iter().map(Self::title_row).collect()
    }

    /// At most `limit` titles by (name, id), after the (name, id) given.
    pub async fn titles_page(&self, after: Option<(&str, &str)>, limit: usize) -> Result<Vec<Title>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = match after {
            None => {
                let q = format!("SELECT {} FROM titles ORDER BY name, id LIMIT $1", Self::TITLE_COLUMNS);
                sqlx::query(&q).bind(limit).fetch_all(&self.pool).await?
            }
            Some((name, id)) => {
                let q = format!(
                    "SELECT {} FROM titles WHERE name > $1 OR (name = $1 AND id > $2) ORDER BY name, id LIMIT $3",
                    Self::TITLE_COLUMNS
                );
                sqlx::query(&q).bind(name).bind(id).bind(limit).fetch_all(&self.pool).await?
            }
        };
        rows.iter().map(Self::title_row).collect()
    }

    /// One title.
    pub async fn title(&self, id: &str) -> Result<Option<Title>, StoreError> {
        let q = format!("SELECT {} FROM titles WHERE id = $1", Self::TITLE_COLUMNS);
        let row = sqlx::query(&q).bind(id).fetch_optional(&self.pool).await?;
        row.as_ref().map(Self::title_row).transpose()
    }

    /// Removes a title; whether it existed.
    pub async fn delete_title(&self, id: &str) -> Result<bool, StoreError> {
        Ok(sqlx::query("DELETE FROM titles WHERE id = $1").bind(id).execute(&self.pool).await?.rows_affected() == 1)
    }

    /// Registers node `n` or updates what its holder may change, in one statement: a
    /// new id is inserted (approved or not, as `n.approved` says); an existing one is
    /// updated only if `n.public_key` is its key and `nonce` is newer than the last one
    /// it signed. Draining, revocation, approval and seats are never touched here.
    /// Returns whether the write happened.
    pub async fn register_node(&self, n: &NodeRecord, nonce: i64) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO nodes (id, provider, public_key, info, capacity, sessions, price_per_hour, gpu_class, encode_ms, \
             titles, draining, revoked, last_heartbeat, last_nonce, approved, seats) \
             VALUES ($1, $2, $3, $4, $5, 0, $6, $7, $8, $9, 0, 0, $10, $11, $12, 0) \
             ON CONFLICT (id) DO UPDATE SET provider = excluded.provider, info = excluded.info, \
             capacity = excluded.capacity, price_per_hour = excluded.price_per_hour, gpu_class = excluded.gpu_class, \
             encode_ms = excluded.encode_ms, titles = excluded.titles, last_heartbeat = excluded.last_heartbeat, \
             last_nonce = excluded.last_nonce \
             WHERE nodes.public_key = excluded.public_key AND nodes.last_nonce < excluded.last_nonce",
        )
        .bind(&n.id)
        .bind(&n.provider)
        .bind(&n.public_key)
        .bind(n.info.to_string())
        .bind(n.capacity)
        .bind(n.price_per_hour)
        .bind(n.gpu_class)
        .bind(n.encode_ms)
        .bind(serde_json::to_string(&n.titles)?)
        .bind(n.last_heartbeat)
        .bind(nonce)
        .bind(b(n.approved))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Accepts `nonce` for `table`'s record `id` if it is newer than the last one (one
    /// statement, so two copies of a request cannot both pass). `false`: a replay.
    pub async fn bump_nonce(&self, table: Member, id: &str, nonce: i64) -> Result<bool, StoreError> {
        let q = match table {
            Member::Node => "UPDATE nodes SET last_nonce = $1 WHERE id = $2 AND last_nonce < $1",
            Member::Relay => "UPDATE relays SET last_nonce = $1 WHERE id = $2 AND last_nonce < $1",
            Member::Checker => "UPDATE checkers SET last_nonce = $1 WHERE id = $2 AND last_nonce < $1",
        };
        Ok(sqlx::query(q).bind(nonce).bind(id).execute(&self.pool).await?.rows_affected() == 1)
    }

    /// The operator approves a node or relay registered while new ones need approval, or a
    /// checker (always). Approving a node also clears a failed verdict: it is checked anew.
    pub async fn approve(&self, table: Member, id: &str) -> Result<bool, StoreError> {
        let q = match table {
            Member::Node => "UPDATE nodes SET approved = 1, verdict = 'unchecked', next_check = 0 WHERE id = $1",
            Member::Relay => "UPDATE relays SET approved = 1 WHERE id = $1",
            Member::Checker => "UPDATE checkers SET approved = 1 WHERE id = $1",
        };
        Ok(sqlx::query(q).bind(id).execute(&self.pool).await?.rows_affected() == 1)
    }

    const NODE_COLUMNS: &'static str = "id, provider, public_key, info, capacity, sessions, price_per_hour, gpu_class, \
        encode_ms, titles, draining, revoked, last_heartbeat, approved, seats, verdict";

    fn node_row(r: &sqlx::any::AnyRow) -> Result<NodeRecord, StoreError> {
        let info: String = r.try_get(3)?;
        let titles: String = r.try_get(9)?;
        Ok(NodeRecord {
            id: r.try_get(0)?,
            provider: r.try_get(1)?,
            public_key: r.try_get(2)?,
            info: serde_json::from_str(&info)?,
            capacity: r.try_get(4)?,
            sessions: r.try_get(5)?,
            price_per_hour: r.try_get(6)?,
            gpu_class: r.try_get(7)?,
            encode_ms: r.try_get(8)?,
            titles: serde_json::from_str(&titles)?,
            draining: r.try_get::<i64, _>(10)? != 0,
            revoked: r.try_get::<i64, _>(11)? != 0,
            last_heartbeat: r.try_get(12)?,
            approved: r.try_get::<i64, _>(13)? != 0,
            seats: r.try_get(14)?,
            verdict: Verdict::parse(&r.try_get::<String, _>(15)?),
        })
    }

    /// One node.
    pub async fn node(&self, id: &str) -> Result<Option<NodeRecord>, StoreError> {
        let q = format!("SELECT {} FROM nodes WHERE id = $1", Self::NODE_COLUMNS);
        let row = sqlx::query(&q).bind(id).fetch_optional(&self.pool).await?;
        row.as_ref().map(Self::node_row).transpose()
    }

    /// Every node.
    pub async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let q = format!("SELECT {} FROM nodes ORDER BY id", Self::NODE_COLUMNS);
        sqlx::query(&q).fetch_all(&self.pool).await?.iter().map(Self::node_row).collect()
    }

    /// At most `limit` nodes by id, after id `after` (`""`: from the first).
    pub async fn nodes_after(&self, after: &str, limit: usize) -> Result<Vec<NodeRecord>, StoreError> {
        let q = format!("SELECT {} FROM nodes WHERE id > $1 ORDER BY id LIMIT $2", Self::NODE_COLUMNS);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        sqlx::query(&q).bind(after).bind(limit).fetch_all(&self.pool).await?.iter().map(Self::node_row).collect()
    }

    /// The ids of revoked nodes.
    pub async fn revoked_nodes(&self) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query("SELECT id FROM nodes WHERE revoked = 1 ORDER BY id").fetch_all(&self.pool).await?;
        rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
    }

    /// Revokes a node or relay; whether it exists.
    pub async fn revoke(&self, table: Member, id: &str) -> Result<bool, StoreError> {
        let q = match table {
            Member::Node => "UPDATE nodes SET revoked = 1 WHERE id = $1",
            Member::Relay => "UPDATE relays SET revoked = 1 WHERE id = $1",
            Member::Checker => "UPDATE checkers SET revoked = 1 WHERE id = $1",
        };
        Ok(sqlx::query(q).bind(id).execute(&self.pool).await?.rows_affected() == 1)
    }

    /// Records a node heartbeat: its session count, the sessions it says it runs, its titles.
    pub async fn node_heartbeat(
        &self,
        id: &str,
        sessions: i64,
        running: &[String],
        titles: &[String],
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE nodes SET sessions = $1, titles = $2, last_heartbeat = $3, running = $4 WHERE id = $5")
            .bind(sessions)
            .bind(serde_json::to_string(titles)?)
            .bind(now)
            .bind(serde_json::to_string(running)?)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Sets a node's draining or revoked flag.
    pub async fn set_node_flag(&self, id: &str, flag: NodeFlag, on: bool) -> Result<(), StoreError> {
        let q = match flag {
            NodeFlag::Draining => "UPDATE nodes SET draining = $1 WHERE id = $2",
            NodeFlag::Revoked => "UPDATE nodes SET revoked = $1 WHERE id = $2",
        };
        sqlx::query(q).bind(b(on)).bind(id).execute(&self.pool).await?;
        Ok(())
    }

    /// Marks relay `id` draining: no new viewers until it registers again.
    pub async fn set_relay_draining(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE relays SET draining = 1 WHERE id = $1").bind(id).execute(&self.pool).await?;
        Ok(())
    }

    /// Registers relay `r` or updates what its holder may change (see
    /// [`Store::register_node`]): revocation and approval are never touched here; draining
    /// is cleared (a relay registers when it starts, and a new process serves again).
    pub async fn register_relay(&self, r: &RelayRecord, nonce: i64) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO relays (id, owner, public_key, public_url, quic_addr, region, capacity, viewers, node_rtt, revoked, \
             last_heartbeat, last_nonce, approved, cert_sha256) VALUES ($1, $2, $3, $4, $5, $6, $7, 0, '{}', 0, $8, $9, $10, $11) \
             ON CONFLICT (id) DO UPDATE SET owner = excluded.owner, public_url = excluded.public_url, \
             quic_addr = excluded.quic_addr, region = excluded.region, capacity = excluded.capacity, \
             cert_sha256 = excluded.cert_sha256, draining = 0, \
             last_heartbeat = excluded.last_heartbeat, last_nonce = excluded.last_nonce \
             WHERE relays.public_key = excluded.public_key AND relays.last_nonce < excluded.last_nonce",
        )
        .bind(&r.id)
        .bind(&r.owner)
        .bind(&r.public_key)
        .bind(&r.public_url)
        .bind(&r.quic_addr)
        .bind(&r.region)
        .bind(r.capacity)
        .bind(r.last_heartbeat)
        .bind(nonce)
        .bind(b(r.approved))
        .bind(&r.cert_sha256)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    const RELAY_COLUMNS: &'static str = "id, owner, public_key, public_url, quic_addr, region, capacity, viewers, \
        node_rtt, revoked, last_heartbeat, approved, cert_sha256, draining";

    fn relay_row(r: &sqlx::any::AnyRow) -> Result<RelayRecord, StoreError> {
        let rtt: String = r.try_get(8)?;
        Ok(RelayRecord {
            id: r.try_get(0)?,
            owner: r.try_get(1)?,
            public_key: r.try_get(2)?,
            public_url: r.try_get(3)?,
            quic_addr: r.try_get(4)?,
            region: r.try_get(5)?,
            capacity: r.try_get(6)?,
            viewers: r.try_get(7)?,
            node_rtt_ms: serde_json::from_str(&rtt)?,
            revoked: r.try_get::<i64, _>(9)? != 0,
            last_heartbeat: r.try_get(10)?,
            approved: r.try_get::<i64, _>(11)? != 0,
            cert_sha256: r.try_get(12)?,
            draining: r.try_get::<i64, _>(13)? != 0,
        })
    }

    /// One relay.
    pub async fn relay(&self, id: &str) -> Result<Option<RelayRecord>, StoreError> {
        let q = format!("SELECT {} FROM relays WHERE id = $1", Self::RELAY_COLUMNS);
        let row = sqlx::query(&q).bind(id).fetch_optional(&self.pool).await?;
        row.as_ref().map(Self::relay_row).transpose()
    }

    /// Every relay.
    pub async fn relays(&self) -> Result<Vec<RelayRecord>, StoreError> {
        let q = format!("SELECT {} FROM relays ORDER BY id", Self::RELAY_COLUMNS);
        sqlx::query(&q).fetch_all(&self.pool).await?.iter().map(Self::relay_row).collect()
    }

    /// At most `limit` relays by id, after id `after` (`""`: from the first).
    pub async fn relays_after(&self, after: &str, limit: usize) -> Result<Vec<RelayRecord>, StoreError> {
        let q = format!("SELECT {} FROM relays WHERE id > $1 ORDER BY id LIMIT $2", Self::RELAY_COLUMNS);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        sqlx::query(&q).bind(after).bind(limit).fetch_all(&self.pool).await?.iter().map(Self::relay_row).collect()
    }

    /// Records a relay heartbeat.
    pub async fn relay_heartbeat(
        &self,
        id: &str,
        viewers: i64,
        node_rtt_ms: &BTreeMap<String, f64>,
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE relays SET viewers = $1, node_rtt = $2, last_heartbeat = $3 WHERE id = $4")
            .bind(viewers)
            .bind(serde_json::to_string(node_rtt_ms)?)
            .bind(now)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Books a seat on the session's node and meters the session's start, in one
    /// transaction: the seat is taken only while the node has one free, so two players
    /// matched at once can never book the same last seat. `false`: the node is full.
    pub async fn start_session(&self, s: &SessionRecord, capacity: i64) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let seat = sqlx::query("UPDATE nodes SET seats = seats + 1 WHERE id = $1 AND seats < $2")
            .bind(&s.node)
            .bind(capacity)
            .execute(&mut *tx)
            .await?;
        if seat.rows_affected() != 1 {
            tx.rollback().await?;
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO sessions (id, title, node, provider, relay, gpu_class, started_at, kind) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&s.id)
        .bind(&s.title)
        .bind(&s.node)
        .bind(&s.provider)
        .bind(&s.relay)
        .bind(s.gpu_class)
        .bind(s.started_at)
        .bind(if s.check { "check" } else { "play" })
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Meters a session's end and frees its seat, in one transaction; `false` if it was
    /// unknown or already ended.
    pub async fn end_session(&self, id: &str, now: i64, reason: &str) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query("UPDATE sessions SET ended_at = $1, end_reason = $2 WHERE id = $3 AND ended_at IS NULL")
            .bind(now)
            .bind(reason)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() != 1 {
            tx.rollback().await?;
            return Ok(false);
        }
        // The seat is free at once; so is the node's own count, which its next heartbeat
        // confirms (a stale heartbeat must not keep the node looking full).
        sqlx::query(
            "UPDATE nodes SET seats = CASE WHEN seats > 0 THEN seats - 1 ELSE 0 END, \
             sessions = CASE WHEN sessions > 0 THEN sessions - 1 ELSE 0 END \
             WHERE id = (SELECT node FROM sessions WHERE id = $1)",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// The relay reports these sessions' players connected at `now`.
    pub async fn players_seen(&self, relay: &str, sessions: &[String], now: i64) -> Result<(), StoreError> {
        for id in sessions {
            sqlx::query("UPDATE sessions SET player_seen = $1 WHERE id = $2 AND relay = $3 AND ended_at IS NULL")
                .bind(now)
                .bind(id)
                .bind(relay)
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    /// Ends running sessions nobody plays: the relay never saw the player connect within
    /// `join_grace` of the match, or has not seen it for `gone_after`, or the session's
    /// relay or node itself went silent for `gone_after` (a node's: [`NODE_GONE`]). Metering follows the relay's record of
    /// a connected player, not the node's claim. Returns how many ended.
    pub async fn sweep_unplayed(&self, now: i64, join_grace: i64, gone_after: i64) -> Result<u64, StoreError> {
        let rows = sqlx::query(
            "SELECT s.id, s.player_seen, s.started_at, r.last_heartbeat, n.last_heartbeat FROM sessions s \
             LEFT JOIN relays r ON r.id = s.relay LEFT JOIN nodes n ON n.id = s.node WHERE s.ended_at IS NULL",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut ended = 0;
        for r in rows {
            let id: String = r.try_get(0)?;
            let seen: Option<i64> = r.try_get(1)?;
            let started: i64 = r.try_get(2)?;
            let relay_alive: Option<i64> = r.try_get(3)?;
            let node_alive: Option<i64> = r.try_get(4)?;
            let reason = match seen {
                // The node stopped heartbeating: its game is gone with it (the relay tells
                // the player, who can start a new session).
                _ if node_alive.is_none_or(|t| now.saturating_sub(t) > gone_after) => Some(NODE_GONE),
                _ if relay_alive.is_none_or(|t| now.saturating_sub(t) > gone_after) => Some("relay gone"),
                None if now.saturating_sub(started) > join_grace => Some("player never connected"),
                Some(t) if now.saturating_sub(t) > gone_after => Some("player gone"),
                _ => None,
            };
            if let Some(reason) = reason
                && self.end_session(&id, now, reason).await?
            {
                ended += 1;
            }
        }
        Ok(ended)
    }

    /// Whether a session exists and has not ended.
    pub async fn session_running(&self, id: &str) -> Result<bool, StoreError> {
        let row = sqlx::query("SELECT id FROM sessions WHERE id = $1 AND ended_at IS NULL")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    /// A session's relay, node and whether it ended.
    pub async fn session(&self, id: &str) -> Result<Option<(String, String, bool)>, StoreError> {
        let row = sqlx::query("SELECT relay, node, ended_at FROM sessions WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get::<Option<i64>, _>(2)?.is_some()))).transpose()
    }

    /// Moves running session `id` from relay `from` to relay `to`; false if it is not
    /// running on `from` (ended, or moved by someone else meanwhile).
    pub async fn move_session(&self, id: &str, from: &str, to: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE sessions SET relay = $1 WHERE id = $2 AND relay = $3 AND ended_at IS NULL")
            .bind(to)
            .bind(id)
            .bind(from)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// A session's title.
    pub async fn session_title(&self, id: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT title FROM sessions WHERE id = $1").bind(id).fetch_optional(&self.pool).await?;
        row.map(|r| Ok(r.try_get(0)?)).transpose()
    }

    /// Ends the node's sessions that started before `before` and that the node no longer
    /// runs (the player never joined, or the relay could not report the end); returns how
    /// many it ended and the relays the node's sessions still open are on (sorted, each
    /// once), read in the same query.
    pub async fn sweep_node_sessions(
        &self,
        node: &str,
        running: &[String],
        before: i64,
        now: i64,
    ) -> Result<(u64, Vec<String>), StoreError> {
        let open = sqlx::query("SELECT id, relay, started_at FROM sessions WHERE node = $1 AND ended_at IS NULL")
            .bind(node)
            .fetch_all(&self.pool)
            .await?;
        let mut ended = 0;
        let mut relays = std::collections::BTreeSet::new();
        for row in open {
            let (id, relay, started_at): (String, String, i64) = (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
            if started_at < before && !running.contains(&id) {
                if self.end_session(&id, now, "not running on the node").await? {
                    ended += 1;
                }
            } else {
                relays.insert(relay);
            }
        }
        Ok((ended, relays.into_iter().collect()))
    }

    /// Sessions on `relay` that ended at or after `since`, with why.
    pub async fn ended_sessions_on_relay(&self, relay: &str, since: i64) -> Result<Vec<(String, String)>, StoreError> {
        let rows = sqlx::query("SELECT id, end_reason FROM sessions WHERE relay = $1 AND ended_at >= $2")
            .bind(relay)
            .bind(since)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get::<Option<String>, _>(1)?.unwrap_or_default()))).collect()
    }

    /// Seconds and sessions per provider, running sessions counted up to `now`: at most
    /// `limit` providers by name, after `after`.
    pub async fn usage_page(&self, now: i64, after: Option<&str>, limit: usize) -> Result<Vec<Usage>, StoreError> {
        let rows = sqlx::query(
            "SELECT provider, COUNT(*), CAST(SUM(COALESCE(ended_at, $1) - started_at) AS BIGINT) FROM sessions \
             WHERE provider > $2 AND kind = 'play' GROUP BY provider ORDER BY provider LIMIT $3",
        )
        .bind(now)
        .bind(after.unwrap_or(""))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Usage {
                    provider: r.try_get(0)?,
                    sessions: r.try_get(1)?,
                    seconds: r.try_get::<Option<i64>, _>(2)?.unwrap_or(0),
                })
            })
            .collect()
    }
}

/// Which kind of pool member a record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Member {
    /// A render node.
    Node,
    /// A relay.
    Relay,
    /// A checker.
    Checker,
}

/// A node flag.
#[derive(Debug, Clone, Copy)]
pub enum NodeFlag {
    /// No new sessions.
    Draining,
    /// Refused everywhere.
    Revoked,
}

/// A session as metered.
#[derive(Debug, Clone)]
pub struct SessionRecord {
    /// Session id (hex).
    pub id: String,
    /// Title.
    pub title: String,
    /// Node.
    pub node: String,
    /// The node's provider.
    pub provider: String,
    /// Relay.
    pub relay: String,
    /// GPU class used.
    pub gpu_class: i64,
    /// Start, Unix seconds.
    pub started_at: i64,
    /// A checker's session (holds a seat, not metered as play).
    pub check: bool,
}
