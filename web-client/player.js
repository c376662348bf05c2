// The Pylon player: asks the relay for a WebRTC session over the signalling WebSocket,
// plays the video as soon as it arrives, and reconnects if the session drops.
import { watchStats } from './stats.js';

const video = document.getElementById('video');
const statsEl = document.getElementById('stats');
const statusEl = document.getElementById('status');

// State the page exposes for dashboards and automated checks.
const pylon = { state: 'connecting', stats: null, viewer: null, pc: null };
window.pylon = pylon;

function setStatus(text) {
  statusEl.textContent = text;
}

function signallingUrl() {
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  return `${scheme}://${location.host}/ws`;
}

async function connect() {
  const pc = new RTCPeerConnection({ bundlePolicy: 'max-bundle' });
  pylon.pc = pc;
  const transceiver = pc.addTransceiver('video', { direction: 'recvonly' });
  // Render frames as soon as they are decoded; the relay also sends playout-delay 0.
  if ('jitterBufferTarget' in transceiver.receiver) transceiver.receiver.jitterBufferTarget = 0;
  pc.ontrack = (event) => {
    video.srcObject = event.streams[0] ?? new MediaStream([event.track]);
    video.play().catch(() => {});
  };
  const stopStats = watchStats(pc, statsEl, (s) => {
    pylon.stats = s;
  });

  const ws = new WebSocket(signallingUrl());
  let retried = false;
  const retry = (why) => {
    if (retried) return;
    retried = true;
    pylon.state = 'reconnecting';
    setStatus(`${why} — reconnecting…`);
    stopStats();
    pc.close();
    ws.close();
    setTimeout(connect, 1000);
  };

  ws.onopen = async () => {
    const offer = await pc.createOffer();
    await pc.setLocalDescription(offer);
    ws.send(JSON.stringify({ type: 'offer', sdp: pc.localDescription.sdp }));
  };
  ws.onmessage = async (event) => {
    const msg = JSON.parse(event.data);
    if (msg.type === 'answer') {
      pylon.viewer = msg.viewer;
      await pc.setRemoteDescription({ type: 'answer', sdp: msg.sdp });
    } else if (msg.type === 'error') {
      retry(`Relay refused: ${msg.message}`);
    }
  };
  ws.onclose = () => retry('Signalling closed');
  pc.onconnectionstatechange = () => {
    if (pc.connectionState === 'connected') {
      pylon.state = 'playing';
      setStatus('');
    } else if (pc.connectionState === 'failed' || pc.connectionState === 'disconnected') {
      retry(`Connection ${pc.connectionState}`);
    }
  };
}

// Show the stream at its native resolution: one video pixel per CSS pixel.
video.addEventListener('resize', () => {
  video.style.width = `${video.videoWidth / devicePixelRatio}px`;
  video.style.height = `${video.videoHeight / devicePixelRatio}px`;
});

connect();
