// The catalog: lists the titles the indexer knows, and starts a game ("second on"):
// ask for candidate relays, measure the RTT to each in parallel (within ~300 ms), let
// the indexer pick the relay and render node, then go to the relay's player page with
// the signed session token in the URL fragment (never sent to a server).

const titlesEl = document.getElementById('titles');
const matchEl = document.getElementById('match');
const poolEl = document.getElementById('pool');

// State exposed for automated checks.
const state = { titles: [], rtt: null, session: null, error: null, nodes: [] };
window.pylonCatalog = state;

/** RTT budget for measuring every candidate, ms. */
const PROBE_BUDGET_MS = 300;
/** Pings per candidate: the first pays for the connection, the minimum is the RTT. */
const PINGS = 3;

/** How long one indexer replica has to answer before the next is tried, ms. */
const REPLICA_TIMEOUT_MS = 4000;

// The indexer's replicas: '' (this page's own origin) first, then the others the indexer
// names at /api/v1/replicas. A call goes to the one that answered last; one that cannot be
// reached, does not answer in time or whose proxy says it is down is passed over for the
// next, so the catalog keeps working when the replica that served it dies.
let replicas = [''];
let current = 0;
state.indexer = location.origin;

async function loadReplicas() {
  try {
    const res = await fetch('/api/v1/replicas', { cache: 'no-store' });
    const body = await res.json();
    const others = (body.replicas || [])
      .map((u) => u.replace(/\/$/, ''))
      .filter((u) => { try { return new URL(u).origin !== location.origin; } catch { return false; } });
    replicas = ['', ...new Set(others)];
  } catch {
    // One replica (or none named): the page's own origin only.
  }
}

async function api(path, init) {
  let lastError = null;
  for (let i = 0; i < replicas.length; i++) {
    const at = (current + i) % replicas.length;
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), REPLICA_TIMEOUT_MS);
    let res;
    try {
      res = await fetch(`${replicas[at]}/api/v1${path}`, { ...init, signal: ctl.signal });
    } catch (e) {
      lastError = e;
      continue;
    } finally {
      clearTimeout(timer);
    }
    if ([502, 503, 504].includes(res.status) && i + 1 < replicas.length) continue;
    if (at !== current) console.info(`indexer: now using ${replicas[at] || location.origin}`);
    current = at;
    state.indexer = replicas[at] || location.origin;
    const body = await res.json().catch(() => ({}));
    if (!res.ok) throw new Error(body.error || `${res.status} ${res.statusText}`);
    return body;
  }
  throw new Error(`the indexer cannot be reached${lastError ? ` (${lastError.message})` : ''}`);
}

/** Every title: the catalog pages (`next_cursor`) through at most 1000 per request. */
async function allTitles() {
  const titles = [];
  let cursor = null;
  do {
    const query = new URLSearchParams({ limit: '1000' });
    if (cursor) query.set('cursor', cursor);
    const page = await api(`/titles?${query}`);
    titles.push(...page.items);
    cursor = page.next_cursor;
  } while (cursor);
  return titles;
}

/** Measures the RTT to one relay: the best of a few `/ping`s, or null if it never answers. */
async function probe(url, deadline) {
  let best = null;
  for (let i = 0; i < PINGS && performance.now() < deadline; i++) {
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), Math.max(1, deadline - performance.now()));
    const t0 = performance.now();
    try {
      await fetch(`${url.replace(/\/$/, '')}/ping`, { cache: 'no-store', signal: ctl.signal });
      const rtt = performance.now() - t0;
      best = best === null ? rtt : Math.min(best, rtt);
    } catch {
      break;
    } finally {
      clearTimeout(timer);
    }
  }
  return best;
}

/** Measures every candidate in parallel; returns { relayId: ms } for those that answered. */
export async function measure(candidates) {
  const deadline = performance.now() + PROBE_BUDGET_MS;
  const results = await Promise.all(candidates.map((c) => probe(c.url, deadline)));
  const rtt = {};
  candidates.forEach((c, i) => {
    if (results[i] !== null) rtt[c.relay] = Number(results[i].toFixed(2));
  });
  return rtt;
}

async function play(titleId) {
  state.error = null;
  matchEl.textContent = 'Finding the nearest relay…';
  try {
    const candidates = await api(`/candidates/${encodeURIComponent(titleId)}`);
    if (candidates.length === 0) throw new Error('no relay is online right now');
    state.rtt = await measure(candidates);
    if (Object.keys(state.rtt).length === 0) throw new Error('no relay answered: check your connection');
    matchEl.textContent = 'Starting your game…';
    const session = await api('/sessions', {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ title: titleId, client_rtt_ms: state.rtt }),
    });
    state.session = session;
    const fragment = sessionFragment(session.token);
    location.href = `${session.relay_url.replace(/\/$/, '')}/play/${session.session}#${fragment}`;
  } catch (e) {
    state.error = e.message;
    matchEl.textContent = `Could not start: ${e.message}`;
  }
}

/**
 * The fragment a relay's page gets: the token, the replica that signed it, every other
 * replica (so the page can still move the session when that one has died), and the RTTs
 * measured to the candidate relays.
 */
function sessionFragment(token) {
  const others = replicas.map((r) => r || location.origin).filter((r) => r !== state.indexer);
  const fragment = new URLSearchParams({ token, catalog: state.indexer });
  if (others.length > 0) fragment.set('indexers', others.join(','));
  // The RTTs measured here: a move after the relay fails picks the next nearest by them.
  if (state.rtt && Object.keys(state.rtt).length > 0) fragment.set('rtt', JSON.stringify(state.rtt));
  return fragment;
}

async function watch(sessionId) {
  matchEl.textContent = 'Joining as a spectator…';
  try {
    // Watch through the nearest relay (it pulls the stream from the player's relay when
    // it is another); the session's title names the candidates.
    const where = await api(`/sessions/${sessionId}`);
    const candidates = where.running ? await api(`/candidates/${encodeURIComponent(where.title)}`).catch(() => []) : [];
    state.rtt = candidates.length > 0 ? await measure(candidates) : {};
    const session = await api(`/sessions/${sessionId}/spectate`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ client_rtt_ms: state.rtt }),
    });
    state.session = session;
    const fragment = sessionFragment(session.token);
    location.href = `${session.relay_url.replace(/\/$/, '')}/watch/${session.session}#${fragment}`;
  } catch (e) {
    state.error = e.message;
    matchEl.textContent = `Cannot watch: ${e.message}`;
  }
}

function render(titles) {
  titlesEl.replaceChildren(...titles.map((t) => {
    const li = document.createElement('li');
    const h = document.createElement('h2');
    h.textContent = t.name;
    const p = document.createElement('p');
    p.textContent = `${t.description} (${t.width}×${t.height}, ${t.fps} fps)`;
    const a = document.createElement('a');
    a.href = `/play/${encodeURIComponent(t.id)}`;
    a.textContent = 'Play';
    a.className = 'play';
    a.dataset.title = t.id;
    a.addEventListener('click', (e) => {
      e.preventDefault();
      history.pushState(null, '', a.href);
      play(t.id);
    });
    li.append(h, p, a);
    return li;
  }));
}

/** The pool's render nodes, with what the checkers found (first 100). */
function renderPool(nodes) {
  const rows = nodes.map((n) => {
    const tr = document.createElement('tr');
    const s = n.score || {};
    const rate = s.checks ? `${s.passed}/${s.checks} passed` : 'not checked yet';
    const fps = s.fps != null ? `${s.fps.toFixed(1)} fps` : '';
    const c2p = s.click_to_photon_p50_ms != null ? `${Math.round(s.click_to_photon_p50_ms)} ms` : '';
    // Multiply-adds a second the proof of capacity showed (network included: a lower bound).
    const gops = s.capacity_gops != null ? `≥ ${s.capacity_gops.toPrecision(2)} Gop/s` : '';
    for (const text of [n.id, n.info?.gpu_model || '', n.state, rate, fps, c2p, gops]) {
      const td = document.createElement('td');
      td.textContent = text;
      tr.append(td);
    }
    tr.dataset.node = n.id;
    tr.dataset.verdict = s.verdict || 'unchecked';
    return tr;
  });
  poolEl.querySelector('tbody').replaceChildren(...rows);
  poolEl.hidden = nodes.length === 0;
}

async function main() {
  await loadReplicas();
  try {
    state.titles = await allTitles();
    render(state.titles);
    if (state.titles.length === 0) matchEl.textContent = 'No games are deployed yet.';
  } catch (e) {
    state.error = e.message;
    matchEl.textContent = `The catalog is unavailable: ${e.message}`;
  }
  api('/nodes?limit=100')
    .then((page) => { state.nodes = page.items; renderPool(page.items); })
    .catch(() => {});
  // `/play/<title>` starts that title at once; `/watch/<session>` joins one as a spectator.
  const m = location.pathname.match(/^\/play\/([^/]+)$/);
  if (m) play(decodeURIComponent(m[1]));
  const w = location.pathname.match(/^\/watch\/([0-9a-f]{32})$/);
  if (w) watch(w[1]);
}

main();
