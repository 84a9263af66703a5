// Generating: the Oxen queue (the body the server's own Oxen dialect writes for the settings), its
// SSE stream for progress and live previews, polling while the stream is down, and result cards.

import { api, askForKey, authHeaders, onKeyChange } from './api.js';
import { $, el, now, showError, sleep } from './dom.js';
import { maskDataUri } from './mask.js';
import { resultParts, updateCompare } from './compare.js';
import { canonical, problemWith, readSettings, state } from './settings.js';
import { showTab } from './tabs.js';

const TERMINAL = new Set(['succeeded', 'failed', 'cancelled']);
export const POLL_MS = 1500;

const stream = {
  early: new Map(), // generation_id -> events that arrived before POST /api/ai/queue answered
  live: false, // whether the SSE stream is connected (else running cards are polled)
  lastEventId: null,
  abort: null, // AbortController of the SSE fetch, to reconnect with a new key
};
onKeyChange(() => stream.abort && stream.abort.abort()); // the stream reconnects with the new key

// Each dialect's request for these settings, from the server (POST /workbench/snippet).
export const requestsFor = (settings) => api('POST', '/workbench/snippet', canonical(settings, maskDataUri()));

export async function generate(event) {
  event.preventDefault();
  const settings = readSettings();
  const problem = problemWith(settings);
  if (problem) return showError(problem);
  showError('');
  $('generate').disabled = true;
  const submitted = now();
  try {
    const { examples } = await requestsFor(settings);
    const oxen = examples.find((example) => example.dialect === 'oxen');
    const { generations } = await api('POST', '/api/ai/queue', oxen.body);
    generations.forEach((g) => addCard(g.generation_id, settings, g.status, submitted));
    $('live').textContent = `Queued ${generations.length} generation${generations.length > 1 ? 's' : ''}.`;
    showTab('tab-results');
    await poll(true);
  } catch (err) {
    // References are checked when the job is submitted, so their errors come back here.
    showError(failure(err.message));
  } finally {
    $('generate').disabled = false;
  }
}

function addCard(id, settings, status, submitted) {
  const card = { id, settings, status, step: 0, total: 0, position: null, times: { queued: submitted } };
  card.node = buildCard(card);
  state.cards.set(id, card);
  $('gallery').prepend(card.node);
  $('empty').hidden = true;
  card.node.scrollIntoView({ block: 'nearest' }); // on a phone the results are below the form
  for (const [type, data, at] of stream.early.get(id) || []) onEvent(type, data, at);
  stream.early.delete(id);
  renderCard(card);
}

// The event stream is read with fetch, not EventSource, because EventSource cannot send the
// Authorization header a keyed server needs. Last-Event-ID resumes without losing events.
export async function listen() {
  for (;;) {
    stream.abort = new AbortController();
    try {
      const headers = authHeaders(stream.lastEventId ? { 'Last-Event-ID': stream.lastEventId } : {});
      // previews=true: also the live previews of jobs that asked for them (the Live preview box).
      const response = await fetch('/api/events?previews=true', { headers, signal: stream.abort.signal });
      if (response.status === 401) askForKey();
      stream.live = response.ok;
      if (response.ok) {
        $('stream-status').textContent = 'Live progress connected.';
        await readEvents(response.body);
      }
    } catch {
      // Dropped or aborted: reconnect below; running cards are polled meanwhile.
    }
    stream.live = false;
    $('stream-status').textContent = 'Live progress reconnecting…';
    await sleep(1000);
  }
}

async function readEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, '\n');
    let end;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      parseFrame(buffer.slice(0, end));
      buffer = buffer.slice(end + 2);
    }
  }
}

function parseFrame(frame) {
  let type = 'message';
  let data = '';
  for (const line of frame.split('\n')) {
    const colon = line.indexOf(':');
    if (colon === 0) continue; // a comment: the keep-alive
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
    if (field === 'event') type = value;
    else if (field === 'data') data += value;
    else if (field === 'id') stream.lastEventId = value;
  }
  if (data) onEvent(type, JSON.parse(data), now());
}

function onEvent(type, data, at) {
  const id = data.generation_id ?? data.job_id ?? data.id;
  const card = state.cards.get(id);
  if (!card) {
    // Events can beat the POST's answer, and a new stream replays the last minute: keep a few.
    if (!stream.early.has(id)) stream.early.set(id, []);
    stream.early.get(id).push([type, data, at]);
    if (stream.early.size > 200) stream.early.delete(stream.early.keys().next().value);
    return;
  }
  if (TERMINAL.has(card.status)) return;
  if (type.endsWith('preview')) {
    // The latest preview only (data: {step, total, index, url}: index counts the job's previews).
    if (data.url && (data.step ?? 0) >= (card.previewStep ?? -1)) {
      Object.assign(card, { preview: data.url, previewStep: data.step ?? 0 });
    }
  } else if (type === 'kleinserve.generation.started' || type === 'kleinserve.generation.progress') {
    Object.assign(card, { status: 'processing', position: null });
    if (data.total) Object.assign(card, { step: data.step, total: data.total });
    card.times.started ??= at;
  } else if (type === 'kleinserve.generation.cancelled') {
    card.status = 'cancelled';
  } else if (type === 'media_generation_completed') {
    card.times.done = at;
    if (data.status === 'succeeded') return void finish(card);
    Object.assign(card, { status: 'failed', error: failure(data.error) });
  }
  renderCard(card);
}

// Queue positions are not events, so queued cards are polled; running ones too while the stream is
// down. The page also waits here for the models to finish loading.
export async function poll(all = false) {
  const banner = $('ready-banner');
  if (!state.config.ready) {
    const ready = await fetch('/readyz').then((r) => r.json()).catch(() => ({}));
    state.config.ready = ready.status === 'ready';
    banner.textContent = ready.status === 'error'
      ? `The models failed to load: ${ready.error}`
      : 'The models are loading; you can prepare a request meanwhile…';
    banner.hidden = state.config.ready;
  }
  for (const card of state.cards.values()) {
    const wanted = all || card.status === 'queued' || !stream.live;
    if (!wanted || TERMINAL.has(card.status) || card.finishing) continue;
    try {
      applyItem(card, await api('GET', `/api/ai/queue/${card.id}`));
    } catch {
      // Transient: the next poll tries again.
    }
  }
}

function applyItem(card, item) {
  if (TERMINAL.has(card.status)) return;
  card.position = item.queue_position ?? null;
  if (item.progress_step) Object.assign(card, { step: item.progress_step, total: item.progress_total });
  if (item.status === 'processing') card.times.started ??= now();
  if (item.status === 'succeeded') return void finish(card, item);
  if (item.status === 'failed') card.error = failure(item.error_message);
  card.status = item.status;
  renderCard(card);
}

// The server names a reference by the field it came in: Oxen's "input_image[1]" (or "input_image"
// for a single one), the canonical "images[0]"; the page says "Reference 2".
function failure(message) {
  return (message || 'The generation failed.').replace(
    /^(?:images|input_image|image)(?:\[(\d+)\])?(?=:)/,
    (m, i) => `Reference ${Number(i ?? 0) + 1}`,
  );
}

// The completion event names the file; the queue item adds the seed actually used and the size.
async function finish(card, item) {
  if (card.finishing) return;
  card.finishing = true;
  card.times.done ??= now();
  try {
    item ??= await api('GET', `/api/ai/queue/${card.id}`);
    card.result = { url: item.result_url, seed: item.seed, width: item.width, height: item.height,
      safety: item.safety };
    card.status = 'succeeded';
    $('live').textContent = `Image ready, seed ${item.seed}.`;
  } catch (err) {
    Object.assign(card, { status: 'failed', error: err.message });
  }
  renderCard(card);
}

async function cancel(card) {
  try {
    const answer = await api('DELETE', `/api/ai/queue/${card.id}`);
    if (answer.generation_status === 'cancelled') card.status = 'cancelled';
    renderCard(card);
  } catch (err) {
    showError(err.message);
  }
}

function dismiss(card) {
  card.node.remove();
  state.cards.delete(card.id);
  $('empty').hidden = state.cards.size > 0;
  updateCompare();
  $('generate').focus();
}

function buildCard(card) {
  card.parts = {
    body: el('div'),
    status: el('p', { class: 'status' }),
    progress: el('progress', { max: 1, value: 0, 'aria-label': 'Progress' }),
    // Cancel while the job runs; Dismiss a failed or cancelled one.
    button: el('button', { type: 'button', onclick: () => (TERMINAL.has(card.status) ? dismiss : cancel)(card) }),
  };
  return el('li', { class: 'card' }, Object.values(card.parts));
}

function renderCard(card) {
  const { body, status, progress, button } = card.parts;
  const running = !TERMINAL.has(card.status);
  card.node.dataset.status = card.status;
  progress.hidden = !running;
  button.hidden = card.status === 'succeeded';
  button.textContent = running ? 'Cancel' : 'Dismiss';
  showPreview(card, running);
  if (card.status === 'queued') {
    // queue_position counts the jobs ahead; null until the first poll answers.
    const ahead = card.position === null ? '' : card.position ? `, ${card.position} ahead` : ', next in line';
    status.textContent = `Queued${ahead}`;
    progress.removeAttribute('value'); // indeterminate while waiting
  } else if (card.status === 'processing') {
    status.textContent = card.total ? `Step ${card.step} of ${card.total}` : 'Starting…';
    Object.assign(progress, { max: card.total || 1, value: card.step });
  } else if (card.status === 'failed') {
    status.textContent = `Failed: ${card.error}`;
  } else if (card.status === 'cancelled') {
    status.textContent = 'Cancelled';
  } else {
    status.textContent = timings(card);
    if (!body.firstChild) body.append(...resultParts(card));
  }
}

// The latest live preview, above the status while the job runs; gone when it ends.
function showPreview(card, running) {
  if (!running || !card.preview) {
    if (card.parts.preview) card.parts.preview.remove();
    card.parts.preview = null;
    return;
  }
  if (!card.parts.preview) {
    card.parts.preview = el('img', { class: 'preview', alt: 'Live preview of this generation' });
    card.parts.status.before(card.parts.preview);
  }
  if (card.parts.preview.getAttribute('src') !== card.preview) card.parts.preview.src = card.preview;
}

function timings(card) {
  const t = card.times;
  const seconds = (ms) => `${(ms / 1000).toFixed(1)} s`;
  const started = t.started ?? t.done;
  return `waited ${seconds(started - t.queued)}, ran ${seconds(t.done - started)}`;
}

