// The Pylon player: asks the relay for a WebRTC session over the signalling WebSocket,
// plays the video as soon as it arrives, sends the player's input on DataChannels,
// measures click-to-photon, and reconnects if the session drops.
import { playoutOffset, watchStats } from './stats.js';
import { SyncGuard } from './sync.js';
import { captureInput } from './input.js';
import { LatencyTracker, displayTime } from './latency.js';

const video = document.getElementById('video');
const statsEl = document.getElementById('stats');
const statusEl = document.getElementById('status');
const fullscreenBtn = document.getElementById('fullscreen');
const unmuteBtn = document.getElementById('unmute');
const volumeInput = document.getElementById('volume');

// `/watch/<session>` or `?role=spectator` watches without sending input.
const params = new URLSearchParams(location.search);
const wantedRole = params.get('role') === 'spectator' || location.pathname.startsWith('/watch/') ? 'spectator' : 'player';
// In a pool the catalog sends us here as /play/<session>#token=…&catalog=…: the token
// (signed by the indexer) decides the role; the fragment never reaches a server log. It
// is moved out of the address bar at once (into this history entry's state, which a
// reload keeps) so it is not shown, shared by copying the URL or kept in the history.
const fragment = new URLSearchParams(location.hash.slice(1));
const saved = history.state || {};
const token = fragment.get('token') || saved.token || null;
const catalog = fragment.get('catalog') || saved.catalog || null;
// The indexer's other replicas (the catalog names them): a move is asked of the one that
// answered last, then of the others, so the session survives the catalog's replica dying.
const indexers = [catalog, ...(fragment.get('indexers') || saved.indexers || '').split(',')]
  .filter((u, i, all) => u && /^https?:\/\//.test(u) && all.indexOf(u) === i);
let indexerAt = 0;
// The RTTs the catalog measured to the candidate relays, ms: a move goes to the nearest.
const rtts = (() => {
  try {
    const parsed = JSON.parse(fragment.get('rtt') || saved.rtts || '{}');
    return Object.fromEntries(Object.entries(parsed).filter(([, v]) => Number.isFinite(v) && v >= 0));
  } catch {
    return {};
  }
})();
// A page this session moved to from a relay that failed: where from, and when the
// failure was noticed (ms since the epoch), for the overlay.
const movedFrom = fragment.get('from') || saved.movedFrom || null;
const movedAt = Number(fragment.get('moved') || saved.movedAt || 0);
// When the last frame was shown there (ms since the epoch).
const movedLast = Number(fragment.get('last') || saved.movedLast || 0);
if (fragment.has('token')) {
  history.replaceState(
    { token, catalog, indexers: indexers.slice(1).join(','), rtts: JSON.stringify(rtts), movedFrom, movedAt, movedLast },
    '', location.pathname + location.search,
  );
}
// The player can share a link that lets others watch this session (as spectators).
const playing = location.pathname.match(/^\/play\/([0-9a-f]{32})$/);
const sessionId = (location.pathname.match(/^\/(?:play|watch)\/([0-9a-f]{32})$/) || [])[1] || null;
if (playing && catalog && /^https?:\/\//.test(catalog)) {
  const share = document.getElementById('share');
  share.href = `${catalog}/watch/${playing[1]}`;
  share.title = 'Others can watch this game with this link';
  share.hidden = false;
}

// State the page exposes for dashboards and automated checks.
const pylon = {
  state: 'connecting', stats: null, viewer: null, role: null, pc: null, latency: null, input: null, error: null,
  // Set when this page took over a session from a failed relay: where from, when the
  // failure was noticed and the last frame shown there, how long until the first frame
  // here (recoveredMs) and how long the picture stood still (gapMs).
  moved: movedFrom ? { from: movedFrom, at: movedAt, last: movedLast, recoveredMs: null, gapMs: null } : null,
  // When the first and the latest frame were shown (ms since the epoch).
  firstFrameAt: null,
  lastFrameAt: null,
  // When the relay said the game server was still linking to it (performance.now()).
  nodeLinking: null,
  // When a frame of requestVideoFrameCallback reaches the screen (latency.js).
  displayTime,
};
window.pylon = pylon;

function setStatus(text) {
  statusEl.textContent = text;
}

function signallingUrl() {
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  return `${scheme}://${location.host}/ws`;
}

let detachInput = () => {};

/** Shows why the relay will not play this link, with a way back to the catalog. */
function refused(message, offer = 'Pick a game') {
  pylon.state = 'refused';
  pylon.error = message;
  statusEl.textContent = `${message}. `;
  if (catalog && /^https?:\/\//.test(catalog)) {
    const a = document.createElement('a');
    a.href = catalog;
    a.id = 'again';
    a.textContent = offer;
    statusEl.append(a);
  }
}

/** What the player reads for why the session ended (the relay's or indexer's reason). */
const ENDED_BECAUSE = {
  'node gone': 'The game server stopped answering, and the game is lost',
  'relay gone': 'The relay carrying the game stopped answering',
};

async function connect() {
  const pc = new RTCPeerConnection({ bundlePolicy: 'max-bundle' });
  pylon.pc = pc;
  const transceiver = pc.addTransceiver('video', { direction: 'recvonly' });
  // Render frames as soon as they are decoded; the relay also sends playout-delay 0.
  if ('jitterBufferTarget' in transceiver.receiver) transceiver.receiver.jitterBufferTarget = 0;
  // The game's sound (Opus). The page starts muted (browsers block sound before a click);
  // the Sound button turns it on.
  const audioTransceiver = pc.addTransceiver('audio', { direction: 'recvonly' });
  if ('jitterBufferTarget' in audioTransceiver.receiver) audioTransceiver.receiver.jitterBufferTarget = 0;
  // Keys, buttons, gamepads, touch (and frame info back): reliable and ordered.
  const inputChannel = pc.createDataChannel('input', { ordered: true });
  // Mouse motion: a lost move is superseded by the next, so never retransmitted.
  const motionChannel = pc.createDataChannel('input-motion', { ordered: false, maxRetransmits: 0 });
  inputChannel.binaryType = 'arraybuffer';
  motionChannel.binaryType = 'arraybuffer';
  pylon.channels = { input: inputChannel, motion: motionChannel };

  // Picture and sound play from one element, so one clock drives both.
  const remote = new MediaStream();
  pc.ontrack = (event) => {
    remote.addTrack(event.track);
    if (video.srcObject !== remote) video.srcObject = remote;
    video.play().catch(() => {});
  };

  detachInput();
  const input = captureInput(video, (buf, reliable) => {
    if (pylon.role !== 'player') return;
    const ch = reliable || motionChannel.readyState !== 'open' ? inputChannel : motionChannel;
    if (ch.readyState === 'open') ch.send(buf);
  });
  detachInput = input.detach;
  pylon.input = input;
  // The relay's latest {audio, video} RTP timestamp → node capture time pairs.
  let clock = null;
  const latency = new LatencyTracker(input.encoder);
  pylon.latency = latency;
  inputChannel.onmessage = (event) => {
    if (typeof event.data !== 'string') return;
    const msg = JSON.parse(event.data);
    if (msg.type === 'frame') latency.onInfo(msg);
    else if (msg.type === 'clock') clock = pylon.clock = msg;
    else if (msg.type === 'node') {
      // The game server is linking to this relay (the session was matched here before it
      // was linked): wait for it, up to LINK_WAIT_MS.
      if (msg.state === 'linking') {
        pylon.nodeLinking = performance.now();
        setStatus('Connecting the game server to this relay…');
        return;
      }
      pylon.nodeLinking = null;
      // The game server's link to the relay dropped (or came back): say so while waiting.
      pylon.nodeLost = msg.state === 'lost';
      const watching = pylon.role === 'player' ? '' : 'Watching (another player has the controls)';
      setStatus(pylon.nodeLost ? 'The game server is not answering — waiting for it…' : watching);
    }
  };
  const onVideoFrame = (now, metadata) => {
    lastFrame = performance.now();
    pylon.lastFrameAt = Date.now();
    if (pylon.firstFrameAt === null) {
      pylon.firstFrameAt = pylon.lastFrameAt;
      const m = pylon.moved;
      if (m && m.at) m.recoveredMs = pylon.firstFrameAt - m.at;
      if (m && m.last) m.gapMs = pylon.firstFrameAt - m.last;
    }
    latency.onFrame(now, metadata);
    if (pc.connectionState !== 'closed') video.requestVideoFrameCallback(onVideoFrame);
  };
  if ('requestVideoFrameCallback' in HTMLVideoElement.prototype) video.requestVideoFrameCallback(onVideoFrame);

  // Holds the picture only while the audible sound would otherwise trail it noticeably.
  const sync = new SyncGuard((ms) => {
    if (inputChannel.readyState !== 'open') return false;
    inputChannel.send(JSON.stringify({ type: 'hold', ms }));
    return true;
  });
  pylon.sync = sync;
  const stopStats = watchStats(pc, statsEl, (s) => {
    if (s.audio) s.avOffsetMs = playoutOffset(transceiver.receiver, audioTransceiver.receiver, clock);
    // With the relay's --av-sync Chromium lip-syncs the streams itself.
    s.pictureHoldMs = sync.update(s.avOffsetMs, !video.muted && video.volume > 0 && !clock?.lipsync);
    const m = pylon.moved;
    const took = m && m.recoveredMs !== null ? ` in ${m.recoveredMs} ms` : '';
    const still = m && m.gapMs !== null ? ` (picture still ${m.gapMs} ms)` : '';
    const switched = m ? `  · moved from ${m.from}${took}${still}` : '';
    s.relay = `relay ${location.host}${switched}`;
    pylon.stats = s;
  }, () => latency.summary());

  const ws = new WebSocket(signallingUrl());
  let retried = false;
  let lastFrame = performance.now();
  let lastBytes = -1;
  let bytesSince = performance.now();
  // In a pool, a relay that stops delivering (no bytes at all, or the game server lost
  // behind it) for a second is left for another one, with the same session.
  const watchdog = setInterval(async () => {
    if (retried || pc.connectionState === 'closed') return;
    const stats = await pc.getStats();
    let bytes = 0;
    for (const r of stats.values()) if (r.type === 'transport') bytes += r.bytesReceived ?? 0;
    const now = performance.now();
    if (bytes !== lastBytes) {
      lastBytes = bytes;
      bytesSince = now;
    }
    // Waiting for the game server to link here: no media yet is expected, for a while.
    const linking = pylon.nodeLinking != null && pylon.firstFrameAt === null;
    const linkedTooLate = linking && now - pylon.nodeLinking > LINK_WAIT_MS;
    if (pylon.state === 'playing' && !linking && now - bytesSince > MOVE_AFTER_MS) {
      retry('The relay stopped answering');
    } else if (token && catalog && sessionId && (pylon.nodeLost || linkedTooLate) && now - lastFrame > MOVE_AFTER_MS && now >= nextMoveTry) {
      // The game server is lost behind this relay: another relay may still reach it.
      // Stay here (it may come back) unless the indexer names one.
      nextMoveTry = now + 2000;
      const answer = await askMove();
      if (retried || answer.status === 503 || answer.status === 429 || answer.status === 0) return;
      retried = true;
      clearInterval(watchdog);
      input.releaseAll();
      stopStats();
      pc.close();
      ws.close();
      followMove(answer, Date.now());
    }
  }, 250);
  let nextMoveTry = 0;
  const retry = (why) => {
    if (retried) return;
    retried = true;
    clearInterval(watchdog);
    if (token && catalog && sessionId) {
      input.releaseAll();
      stopStats();
      pc.close();
      ws.close();
      moveRelay(why);
      return;
    }
    pylon.state = 'reconnecting';
    setStatus(`${why} — reconnecting…`);
    input.releaseAll();
    stopStats();
    pc.close();
    ws.close();
    setTimeout(connect, 1000);
  };

  ws.onopen = async () => {
    const offer = await pc.createOffer();
    await pc.setLocalDescription(offer);
    const msg = { type: 'offer', sdp: pc.localDescription.sdp, role: wantedRole };
    if (token) msg.token = token;
    ws.send(JSON.stringify(msg));
  };
  ws.onmessage = async (event) => {
    const msg = JSON.parse(event.data);
    if (msg.type === 'answer') {
      pylon.viewer = msg.viewer;
      pylon.role = msg.role;
      await pc.setRemoteDescription({ type: 'answer', sdp: msg.sdp });
    } else if (msg.type === 'ended') {
      // The game itself ended (exited, crashed, never drew): reconnecting cannot help.
      const why = ENDED_BECAUSE[msg.reason] || `The game ended: ${msg.reason}`;
      refused(why, 'Start a new game');
      pylon.state = 'ended';
      pylon.endedReason = msg.reason;
      retried = true;
      clearInterval(watchdog);
      stopStats();
      pc.close();
      ws.close();
    } else if (msg.type === 'bye') {
      retry(`${msg.reason}`);
    } else if (msg.type === 'error') {
      if (/session token/.test(msg.message)) {
        // Retrying cannot help: the session is over, or the link is not valid here.
        refused(msg.message);
        retried = true;
        clearInterval(watchdog);
        stopStats();
        pc.close();
        ws.close();
      } else {
        retry(`Relay refused: ${msg.message}`);
      }
    }
  };
  ws.onclose = () => retry('Signalling closed');
  pc.onconnectionstatechange = () => {
    if (pc.connectionState === 'connected') {
      pylon.state = 'playing';
      setStatus(pylon.role === 'player' ? '' : 'Watching (another player has the controls)');
    } else if (pc.connectionState === 'failed' || pc.connectionState === 'disconnected') {
      retry(`Connection ${pc.connectionState}`);
    }
  };
}

/** How long a relay may deliver nothing before the page moves to another one, ms. */
const MOVE_AFTER_MS = 1000;
/**
 * How long the page waits for the game server to link to its relay (a session matched to a
 * relay the node was not linked to yet) before asking for a relay it is linked to, ms.
 */
const LINK_WAIT_MS = 10000;

/**
 * Asks the indexer to move this session to another relay (the token proves it is ours):
 * the replica that answered last first, the next one when it cannot be reached, does not
 * answer within 2 s, or sits behind a proxy answering 502–504.
 */
async function askMove() {
  let answer = { status: 0, body: {} };
  for (let i = 0; i < indexers.length; i += 1) {
    const at = (indexerAt + i) % indexers.length;
    try {
      // A plain-text body keeps this a simple cross-origin request (no preflight).
      const r = await fetch(`${indexers[at].replace(/\/$/, '')}/api/v1/sessions/${sessionId}/move`, {
        method: 'POST', body: JSON.stringify({ token, client_rtt_ms: rtts }), signal: AbortSignal.timeout(2000),
      });
      answer = { status: r.status, body: await r.json().catch(() => ({})) };
      if ([502, 503, 504].includes(r.status) && !answer.body.reason && i + 1 < indexers.length) continue;
      if (at !== indexerAt) console.info(`indexer: now using ${indexers[at]}`);
      indexerAt = at;
      return answer;
    } catch (e) {
      // Unreachable or silent: the next replica.
    }
  }
  return answer;
}

/**
 * Carries out the indexer's answer to a move: continue on the relay it names (same
 * session, same game), or say why the game cannot go on. Returns false to try again.
 */
function followMove({ status, body }, noticed) {
  if (status === 201) {
    const next = new URLSearchParams({
      token: body.token, catalog: indexers[indexerAt], indexers: indexers.filter((_, i) => i !== indexerAt).join(','),
      rtt: JSON.stringify(rtts), from: location.host, moved: String(noticed),
      last: String(pylon.lastFrameAt || noticed),
    });
    const page = location.pathname.startsWith('/watch/') ? 'watch' : 'play';
    location.href = `${body.relay_url.replace(/\/$/, '')}/${page}/${sessionId}#${next}`;
    return true;
  }
  if (status === 410 || status === 404) {
    const reason = status === 410 ? 'node gone' : 'ended';
    refused(ENDED_BECAUSE[reason] || 'The game ended', 'Start a new game');
    pylon.state = 'ended';
    pylon.endedReason = reason;
    return true;
  }
  if (status === 409 || status === 401) {
    refused('This game continues in another window');
    return true;
  }
  return false;
}

/**
 * Moves this session to another relay after its relay failed: retries while no relay can
 * take it yet; stops when the game server itself is gone.
 */
async function moveRelay(why) {
  const noticed = Date.now();
  pylon.state = 'moving';
  setStatus(`${why} — moving to another relay…`);
  for (let attempt = 0; attempt < 40; attempt += 1) {
    const answer = await askMove();
    if (followMove(answer, noticed)) return;
    const wait = answer.body.retry_after_secs ? Math.min(5000, 1000 * answer.body.retry_after_secs) : 500;
    await new Promise((done) => setTimeout(done, wait));
  }
  refused('No relay can carry this game now');
}

// Sound: off until the player turns it on (autoplay rules), then at the chosen volume.
const showSound = () => {
  unmuteBtn.textContent = video.muted ? 'Sound off' : 'Sound on';
  unmuteBtn.setAttribute('aria-pressed', String(!video.muted));
};
const toggleSound = () => {
  video.muted = !video.muted;
  video.play().catch(() => {});
  showSound();
};
unmuteBtn.addEventListener('click', toggleSound);
volumeInput.addEventListener('input', () => {
  video.volume = Number(volumeInput.value);
  if (video.muted && video.volume > 0) toggleSound();
});
video.volume = Number(volumeInput.value);
window.addEventListener('keydown', (e) => {
  if (e.ctrlKey && e.shiftKey && e.code === 'KeyM') toggleSound();
});
pylon.sound = { toggle: toggleSound };

// Show the stream at its native resolution: one video pixel per device pixel.
video.addEventListener('resize', () => {
  if (document.fullscreenElement) return;
  video.style.width = `${video.videoWidth / devicePixelRatio}px`;
  video.style.height = `${video.videoHeight / devicePixelRatio}px`;
});

// Fullscreen from a button or the F key's neighbour that no browser claims: Ctrl+Shift+F.
const toggleFullscreen = () => {
  if (document.fullscreenElement) document.exitFullscreen().catch(() => {});
  else document.documentElement.requestFullscreen().catch(() => {});
};
fullscreenBtn.addEventListener('click', toggleFullscreen);
window.addEventListener('keydown', (e) => {
  if (e.ctrlKey && e.shiftKey && e.code === 'KeyF') toggleFullscreen();
});
document.addEventListener('fullscreenchange', () => {
  video.style.width = document.fullscreenElement ? '100vw' : `${video.videoWidth / devicePixelRatio}px`;
  video.style.height = document.fullscreenElement ? '100vh' : `${video.videoHeight / devicePixelRatio}px`;
  // Keep shortcuts (Escape, Ctrl+W…) in the game while fullscreen, where the browser allows.
  if (document.fullscreenElement && navigator.keyboard && navigator.keyboard.lock) {
    navigator.keyboard.lock().catch(() => {});
  }
});

connect();
