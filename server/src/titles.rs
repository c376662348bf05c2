//! Studio titles on the node: which the node can run (the catalog's launch specs whose
//! program it has), and the runner that gives each player session of such a title its
//! sandbox (`pylon_title::sandbox`), points the frame path at the sandbox's screen, and
//! ends the session — telling the player through the relay, and the indexer — when the
//! title exits, crashes, or shows nothing within the deadline.

use crate::metrics::{DropReason, ServerMetrics};
use crate::pipeline::SourceCommand;
use crate::uplink::{SessionSignal, UplinkCommand};
use pylon_indexer_client::api::{InputKind, LAUNCH_BUILTIN_DEMO, LAUNCH_EXEC, Title};
use pylon_title::sandbox::{LaunchSpec, Sandbox, SandboxConfig, resolve_command};
use pylon_title::x11::X11Session;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// The titles a node knows, by id.
#[derive(Debug, Clone, Default)]
pub struct TitleCatalog {
    titles: BTreeMap<String, Title>,
}

impl TitleCatalog {
    /// A catalog of `titles` (later ones replace earlier ones with the same id).
    pub fn new(titles: impl IntoIterator<Item = Title>) -> Self {
        Self { titles: titles.into_iter().map(|t| (t.id.clone(), t)).collect() }
    }

    /// Adds or replaces a title.
    pub fn insert(&mut self, title: Title) {
        self.titles.insert(title.id.clone(), title);
    }

    /// A title by id.
    pub fn get(&self, id: &str) -> Option<&Title> {
        self.titles.get(id)
    }

    /// Why this node cannot run `title`, if it cannot.
    pub fn unavailable(title: &Title, gpu_class: u8) -> Option<String> {
        match title.launch.as_str() {
            LAUNCH_BUILTIN_DEMO => None,
            LAUNCH_EXEC if resolve_command(&title.command).is_none() => {
                Some(format!("its program {:?} is not installed", title.command))
            }
            LAUNCH_EXEC if title.needs_gpu && gpu_class == 0 => {
                Some("it needs a GPU and this node renders on the CPU".into())
            }
            LAUNCH_EXEC => None,
            other => Some(format!("unknown launch {other:?}")),
        }
    }

    /// The ids of the titles this node can run (what it advertises), logging why the
    /// others are left out.
    pub fn installed(&self, gpu_class: u8) -> Vec<String> {
        self.titles
            .values()
            .filter(|t| match Self::unavailable(t, gpu_class) {
                None => true,
                Some(why) => {
                    tracing::info!(title = %t.id, "not offering this title: {why}");
                    false
                }
            })
            .map(|t| t.id.clone())
            .collect()
    }
}

/// The runner's settings.
#[derive(Debug, Clone)]
pub struct TitleRunnerConfig {
    /// Where sandboxes live and how they start and stop.
    pub sandbox: SandboxConfig,
    /// A title that shows no frame within this ends its session.
    pub first_frame_deadline: Duration,
    /// The stream's picture size (input coordinates arrive in it).
    pub video: (u32, u32),
    /// What a session with no title (outside a pool) runs: a title id, or the demo.
    pub default_title: Option<String>,
    /// Between sessions the frame path rests (renders and encodes nothing): a node in a
    /// pool, whose viewers only come with a session. Outside a pool the demo plays on for
    /// whoever watches.
    pub rest_between_sessions: bool,
}

impl TitleRunnerConfig {
    /// What the frame path shows with no session.
    fn between_sessions(&self) -> SourceCommand {
        if self.rest_between_sessions { SourceCommand::Idle } else { SourceCommand::Demo }
    }
}

/// What the runner drives.
#[derive(Debug)]
pub struct TitleRunnerLinks {
    /// Session starts and ends from the relay link.
    pub signals: mpsc::UnboundedReceiver<SessionSignal>,
    /// Requests to the relay link (end a session).
    pub commands: mpsc::UnboundedSender<UplinkCommand>,
    /// What the frame path shows.
    pub source: std::sync::mpsc::Sender<SourceCommand>,
    /// The indexer, told when the node ends a session (signed by the node), and asked
    /// for titles deployed after the node started.
    pub indexer: Option<pylon_indexer_client::Client>,
}

struct Active {
    session: String,
    title: String,
    sandbox: Option<Sandbox>,
    started: Instant,
    shown: Arc<AtomicBool>,
}

/// Runs title sessions until `shutdown`.
pub async fn run(
    config: TitleRunnerConfig,
    mut catalog: TitleCatalog,
    links: TitleRunnerLinks,
    metrics: ServerMetrics,
    mut shutdown: watch::Receiver<bool>,
) {
    let TitleRunnerLinks { mut signals, commands, source, indexer } = links;
    let mut active: Option<Active> = None;
    // The session running (a title's or the demo's).
    let mut current: Option<String> = None;
    let _ = source.send(config.between_sessions());
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            signal = signals.recv() => match signal {
                None => break,
                Some(SessionSignal::Started { session, title }) => {
                    if let Some(old) = active.take() {
                        stop(old, config.between_sessions(), &source, &metrics).await;
                    }
                    current = Some(session.clone());
                    let title = if title.is_empty() { config.default_title.clone().unwrap_or_default() } else { title };
                    if catalog.get(&title).is_none()
                        && let Some(client) = &indexer
                    {
                        // Deployed after this node started: ask the catalog.
                        match client.title(&title).await {
                            Ok(Some(t)) => catalog.insert(t),
                            Ok(None) => {}
                            Err(e) => tracing::warn!(title, "cannot fetch the title's launch spec: {e}"),
                        }
                    }
                    match catalog.get(&title).cloned() {
                        Some(t) if t.launch == LAUNCH_EXEC => {
                            match start(&config, &session, &t, &source, &metrics).await {
                                Ok(a) => active = Some(a),
                                Err((reason, label)) => {
                                    end_by_node(&session, &reason, label, &commands, indexer.as_ref(), &metrics);
                                    current = None;
                                    let _ = source.send(config.between_sessions());
                                }
                            }
                        }
                        // The built-in demo, or no title named (outside a pool): the demo.
                        _ => {
                            let _ = source.send(SourceCommand::Demo);
                        }
                    }
                }
                Some(SessionSignal::Ended { session }) => {
                    if active.as_ref().is_some_and(|a| a.session == session)
                        && let Some(a) = active.take()
                    {
                        tracing::info!(session, title = %a.title, "the player left; stopping the title");
                        stop(a, config.between_sessions(), &source, &metrics).await;
                    } else if current.as_deref() == Some(session.as_str()) {
                        let _ = source.send(config.between_sessions());
                    }
                    if current.as_deref() == Some(session.as_str()) {
                        current = None;
                    }
                }
            },
            _ = tick.tick() => {
                let Some(a) = active.as_mut() else { continue };
                // A sound server that died is restarted: the picture never waits for sound.
                if let Some(how) = a.sandbox.as_mut().and_then(Sandbox::revive_sound) {
                    metrics.audio_errors.inc();
                    tracing::warn!(session = %a.session, "the session's sound server {how}; restarted it");
                }
                let exited = a.sandbox.as_mut().and_then(Sandbox::exited);
                let failure = match exited {
                    Some(how) => {
                        let log = a.sandbox.as_ref().map(|s| s.log_tail(300)).unwrap_or_default();
                        tracing::warn!(session = %a.session, title = %a.title, "{how}; its last output: {log}");
                        let label = if how.to_string().contains("signal") { "crashed" } else { "exited" };
                        Some((how.to_string(), label))
                    }
                    None if !a.shown.load(Ordering::Relaxed) && a.started.elapsed() > config.first_frame_deadline => {
                        let secs = config.first_frame_deadline.as_secs();
                        Some((format!("the game showed no picture within {secs} s"), "no_picture"))
                    }
                    None => None,
                };
                if let Some((reason, label)) = failure
                    && let Some(a) = active.take()
                {
                    end_by_node(&a.session, &reason, label, &commands, indexer.as_ref(), &metrics);
                    if current.as_deref() == Some(a.session.as_str()) {
                        current = None;
                    }
                    stop(a, config.between_sessions(), &source, &metrics).await;
                }
            }
            _ = shutdown.changed() => break,
        }
    }
    if let Some(a) = active.take() {
        stop(a, config.between_sessions(), &source, &metrics).await;
    }
}

/// Starts `title`'s sandbox for `session` and points the frame path at its screen.
async fn start(
    config: &TitleRunnerConfig,
    session: &str,
    title: &Title,
    source: &std::sync::mpsc::Sender<SourceCommand>,
    metrics: &ServerMetrics,
) -> Result<Active, (String, &'static str)> {
    let spec = LaunchSpec {
        command: title.command.clone(),
        args: title.args.clone(),
        workdir: (!title.workdir.is_empty()).then(|| title.workdir.clone().into()),
        env: title.env.clone(),
        width: u32::try_from(title.width).unwrap_or(1280),
        height: u32::try_from(title.height).unwrap_or(720),
        gamepads: u8::from(title.input_kinds.contains(&InputKind::Gamepad)),
    };
    let (sandbox_config, session_id, video) = (config.sandbox.clone(), session.to_string(), config.video);
    let started = tokio::task::spawn_blocking(move || {
        let mut sandbox = Sandbox::start(&sandbox_config, &session_id, &spec)
            .map_err(|e| (format!("the game could not start: {e}"), "start_failed"))?;
        let number: u32 = sandbox.display().trim_start_matches(':').parse().unwrap_or(0);
        match X11Session::connect(number, sandbox.cookie(), video) {
            Ok(mut screen) => {
                screen.attach_pads(sandbox.take_pads());
                let layer = sandbox.take_capture().map(|c| Box::new(crate::capture::LayerSource::new(c)));
                let audio = sandbox.audio_server();
                Ok((sandbox, screen, layer, audio))
            }
            Err(e) => {
                sandbox.stop();
                Err((format!("the game's display could not be captured: {e}"), "start_failed"))
            }
        }
    })
    .await
    .map_err(|e| (format!("the game could not start: {e}"), "start_failed"))?;
    let (sandbox, screen, layer, audio) = started?;
    let shown = Arc::new(AtomicBool::new(false));
    tracing::info!(session, title = %title.id, display = %sandbox.display(), "title started");
    let _ = source.send(SourceCommand::Title { screen: Box::new(screen), layer, shown: shown.clone(), audio });
    metrics.title_sessions.inc();
    metrics.title_running.set(1);
    Ok(Active {
        session: session.to_string(),
        title: title.id.clone(),
        sandbox: Some(sandbox),
        started: Instant::now(),
        shown,
    })
}

/// Tells the relay (and through it the player) and the indexer that the node ended
/// `session`.
fn end_by_node(
    session: &str,
    reason: &str,
    label: &'static str,
    commands: &mpsc::UnboundedSender<UplinkCommand>,
    indexer: Option<&pylon_indexer_client::Client>,
    metrics: &ServerMetrics,
) {
    tracing::warn!(session, "ending the session: {reason}");
    metrics.title_failures.get_or_create(&DropReason { reason: label }).inc();
    let _ = commands.send(UplinkCommand::EndSession { reason: reason.to_string() });
    if let Some(client) = indexer
        && !session.is_empty()
    {
        let (client, session, reason) = (client.clone(), session.to_string(), reason.to_string());
        tokio::spawn(async move {
            if let Err(e) = client.end_session(&session, &reason).await {
                tracing::debug!(session, "the indexer did not take the session's end: {e}");
            }
        });
    }
}

/// Points the frame path at `next` (the demo, or rest) and removes the sandbox.
async fn stop(
    active: Active,
    next: SourceCommand,
    source: &std::sync::mpsc::Sender<SourceCommand>,
    metrics: &ServerMetrics,
) {
    let _ = source.send(next);
    metrics.title_running.set(0);
    if let Some(sandbox) = active.sandbox {
        let report = tokio::task::spawn_blocking(move || sandbox.stop()).await;
        tracing::info!(session = %active.session, title = %active.title, ?report, "title stopped");
    }
}
