// kleinserve Workbench: try the models, compare results, copy the exact API call.
//
// Plain JavaScript with no dependencies and no build step, so the page ships as package data and
// works offline. It talks to the server only through public APIs: GET /workbench/config for what the
// Oxen API does not say (ids in every dialect, limits, the size table), then the Oxen queue
// (POST /api/ai/queue, GET and DELETE /api/ai/queue/{id}) and its SSE stream (GET /api/events).
'use strict';

const KEY_STORE = 'kleinserve.apiKey';
// 1min.ai only knows these aspect ratios and megapixel budgets (see api/dialects/onemin.py).
const ONEMIN_RATIOS = ['1:1', '16:9', '9:16', '3:2', '2:3', '4:5', '5:4'];
const ONEMIN_MP = ['0.25', '1'];
const QUALITY = { standard: 90, high: 100 }; // Oxen's output_quality names, as encoder qualities
const TERMINAL = new Set(['succeeded', 'failed', 'cancelled']);
const POLL_MS = 1500;
const WHY = { 401: 'This server needs an API key (enter it under “API key”)', 402: 'Out of credits',
  403: 'Not allowed', 413: 'The request is too large', 429: 'Too many requests',
  503: 'The server cannot take this now' };

const state = {
  config: null,
  refs: [], // {src, name, width, height}: src is a data: URI or an http(s) URL, sent as it is
  cards: new Map(), // generation_id -> card (one per queued generation)
  early: new Map(), // generation_id -> events that arrived before POST /api/ai/queue answered
  live: false, // whether the SSE stream is connected (else running cards are polled)
  lastEventId: null,
  stream: null, // AbortController of the SSE fetch, to reconnect with a new key
};

const $ = (id) => document.getElementById(id);
const on = (id, type, handler) => $(id).addEventListener(type, handler);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const now = () => performance.now();

// A small element builder: el('button', {type: 'button', onclick: f}, 'text').
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith('on')) node.addEventListener(name.slice(2), value);
    else if (name === 'class') node.className = value;
    else node.setAttribute(name, value === true ? '' : String(value));
  }
  node.append(...children.flat().filter((child) => child !== null && child !== undefined));
  return node;
}

/* ---------- Talking to the server ---------- */

const apiKey = () => localStorage.getItem(KEY_STORE) || '';

function authHeaders(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function api(method, path, body) {
  const headers = authHeaders(body ? { 'Content-Type': 'application/json' } : {});
  const response = await fetch(path, { method, headers, body: body && JSON.stringify(body) }).catch((err) => {
    throw new Error(`Cannot reach the server (${err.message}).`);
  });
  const text = await response.text();
  let data = null;
  try {
    data = JSON.parse(text);
  } catch {
    // Not JSON (a proxy's error page, say): readableError falls back to the text.
  }
  if (!response.ok) {
    if (response.status === 401) askForKey();
    throw new Error(readableError(response, data, text));
  }
  return data;
}

// Error bodies differ by path (Oxen's, kleinserve's, FastAPI's); people should read a sentence.
function readableError(response, data, text) {
  const error = data && typeof data === 'object' && 'error' in data ? data.error : data;
  let message = typeof error === 'string' ? error : error && (error.detail || error.message || error.title);
  if (Array.isArray(message)) message = message.map((item) => item.msg || JSON.stringify(item)).join('; ');
  if (!message) message = text.trim().slice(0, 200) || response.statusText;
  const why = WHY[response.status];
  const retry = response.headers.get('Retry-After');
  return `${why ? `${why}: ` : ''}${message}${retry ? ` (try again in ${retry} s)` : ''}`;
}

function showError(message) {
  $('error-text').textContent = message;
  $('error').hidden = !message;
}

function askForKey() {
  $('settings').open = true;
  $('key-status').textContent = apiKey()
    ? 'The server refused this key: check it, or ask for a new one.'
    : 'This server needs an API key.';
  $('api-key').focus();
}

function saveKey(key) {
  if (key) localStorage.setItem(KEY_STORE, key);
  else localStorage.removeItem(KEY_STORE);
  $('api-key').value = key;
  $('key-status').textContent = key ? 'Saved in this browser.' : 'Forgotten.';
  showError('');
  if (state.stream) state.stream.abort(); // the event stream reconnects with the new key
  renderSnippet();
}

/* ---------- Start-up: config, readiness, controls ---------- */

async function start() {
  wireControls();
  $('api-key').value = apiKey();
  while (!state.config) {
    try {
      state.config = await api('GET', '/workbench/config');
    } catch (err) {
      showError(`Cannot load the Workbench configuration. ${err.message}`);
      await sleep(3000);
    }
  }
  showError('');
  applyConfig(state.config);
  listen();
  poll(); // at once: says whether the models are still loading
  setInterval(poll, POLL_MS);
}

function applyConfig(config) {
  for (const m of config.models) {
    const sampling = m.distilled ? 'distilled' : `guidance ${m.guidance.toFixed(1)}`;
    $('model').append(el('option', { value: m.id }, `${m.name} (${m.steps} steps, ${sampling})`));
  }
  $('demo-banner').hidden = !config.demo;
  for (const ratio of Object.keys(config.sizes)) $('ratio').append(el('option', {}, ratio));
  for (const mp of Object.keys(config.sizes['1:1'])) $('mp').append(el('option', { selected: mp === '1' }, mp));
  const limits = config.limits;
  for (const id of ['width', 'height']) Object.assign($(id), { min: limits.min_side, max: limits.max_side });
  $('steps').max = limits.max_steps;
  $('guidance').max = limits.max_guidance;
  $('count').max = limits.max_generations;
  $('prompt').maxLength = limits.max_prompt_chars;
  if (config.auth_required && !apiKey()) askForKey();
  onModelChange();
}

const model = () => state.config.models.find((m) => m.id === $('model').value) || state.config.models[0];

// Distilled variants run their fixed steps and guidance (Verda refuses any other value; the
// others would accept it, but the model was distilled for exactly these). Base variants are free.
function onModelChange() {
  const m = model();
  $('steps').value = m.steps;
  $('guidance').value = m.guidance;
  $('steps').disabled = $('guidance').disabled = m.distilled;
  $('sampling-note').textContent = m.distilled
    ? `${m.name} is step- and guidance-distilled: ${m.steps} steps and guidance ${m.guidance} are fixed.`
    : `${m.name} runs true classifier-free guidance; default ${m.steps} steps, guidance ${m.guidance}.`;
  update();
}

function wireControls() {
  on('controls', 'submit', generate);
  on('controls', 'input', update);
  on('controls', 'change', update);
  on('model', 'change', onModelChange);
  // Enter generates from the prompt; Shift+Enter (or an IME composition) keeps typing.
  on('prompt', 'keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $('controls').requestSubmit();
    }
  });
  on('seed-lock', 'change', () => {
    if ($('seed-lock').checked && $('seed').value === '') $('seed').value = randomSeed();
  });
  on('seed-new', 'click', () => setSeed(randomSeed()));
  on('key-form', 'submit', (event) => {
    event.preventDefault();
    saveKey($('api-key').value.trim());
  });
  on('key-forget', 'click', () => saveKey(''));
  on('error-close', 'click', () => showError(''));
  on('compare', 'click', showComparison);
  on('dialect', 'change', renderSnippet);
  on('reveal-key', 'change', renderSnippet);
  on('copy', 'click', copySnippet);
  wireReferences();
  wireTabs();
}

const randomSeed = () => crypto.getRandomValues(new Uint32Array(1))[0];

function setSeed(seed) {
  $('seed-lock').checked = true;
  $('seed').value = seed;
  update();
}

/* ---------- The current settings, and the Oxen request they make ---------- */

const pixelMode = () => document.querySelector('input[name="size-mode"]:checked').value === 'pixels';

function currentSize() {
  if (pixelMode()) return { width: Number($('width').value), height: Number($('height').value) };
  const [width, height] = state.config.sizes[$('ratio').value][$('mp').value];
  return { width, height, ratio: $('ratio').value, mp: $('mp').value };
}

function readSettings() {
  const m = model();
  return {
    model: m,
    prompt: $('prompt').value,
    refs: state.refs.map((ref) => ref.src),
    ...currentSize(),
    steps: m.distilled ? m.steps : Number($('steps').value),
    guidance: m.distilled ? m.guidance : Number($('guidance').value),
    seed: $('seed-lock').checked && $('seed').value !== '' ? Number($('seed').value) : null,
    count: Number($('count').value),
    format: $('format').value,
    quality: $('quality').value,
  };
}

// What the server would refuse, said before sending (the server checks again).
function problemWith(s) {
  const limits = state.config.limits;
  const within = (value, low, high) => Number.isFinite(value) && value >= low && value <= high;
  if (!s.prompt.trim()) return 'Write a prompt first.';
  for (const [name, value] of [['Width', s.width], ['Height', s.height]]) {
    if (!Number.isInteger(value) || value % 16 || !within(value, limits.min_side, limits.max_side)) {
      return `${name} must be a multiple of 16 from ${limits.min_side} to ${limits.max_side}.`;
    }
  }
  if (s.width * s.height > limits.max_pixels) return `${s.width}×${s.height} is over ${limits.max_pixels} pixels.`;
  if (!Number.isInteger(s.steps) || !within(s.steps, 1, limits.max_steps)) return `Steps: 1 to ${limits.max_steps}.`;
  if (!within(s.guidance, 0, limits.max_guidance)) return `Guidance: 0 to ${limits.max_guidance}.`;
  if (s.seed !== null && !(Number.isSafeInteger(s.seed) && s.seed >= 0)) return 'The seed is a whole number from 0.';
  if (!Number.isInteger(s.count) || !within(s.count, 1, limits.max_generations)) {
    return `Images: 1 to ${limits.max_generations}.`;
  }
  return null;
}

// The body of POST /api/ai/queue. The API tab shows this very object, so the snippets are exact.
function oxenBody(s) {
  const body = { model: s.model.oxen, prompt: s.prompt };
  if (s.refs.length) body.input_image = s.refs;
  // Oxen's own aspect_ratio means ~1 MP; other budgets go as the explicit size they map to.
  if (s.ratio && s.mp === '1') body.aspect_ratio = s.ratio;
  else body.image_size = { width: s.width, height: s.height };
  if (!s.model.distilled) Object.assign(body, { num_inference_steps: s.steps, guidance_scale: s.guidance });
  if (s.seed !== null) body.seed = s.seed;
  body.output_format = s.format;
  if (s.format !== 'png') body.output_quality = s.quality;
  if (s.count > 1) body.num_generations = s.count;
  return body;
}

function update() {
  $('size-ratio').hidden = pixelMode();
  $('size-pixels').hidden = !pixelMode();
  $('seed').disabled = !$('seed-lock').checked;
  $('quality').disabled = $('format').value === 'png';
  if (!state.config) return;
  const size = currentSize();
  $('size-note').textContent = `${size.width} × ${size.height} pixels`;
  renderSnippet();
}

/* ---------- Reference images ---------- */

function wireReferences() {
  const drop = $('drop');
  on('ref-file', 'change', async (event) => {
    await addFiles(event.target.files);
    event.target.value = ''; // so choosing the same file again still fires "change"
  });
  on('ref-url-add', 'click', addUrlField);
  on('ref-url', 'keydown', (event) => {
    if (event.key === 'Enter') {
      event.preventDefault(); // Enter here adds the URL rather than generating
      addUrlField();
    }
  });
  for (const type of ['dragenter', 'dragover']) {
    drop.addEventListener(type, (event) => {
      event.preventDefault();
      drop.classList.add('over');
    });
  }
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', async (event) => {
    event.preventDefault();
    drop.classList.remove('over');
    if (event.dataTransfer.files.length) return addFiles(event.dataTransfer.files);
    // An image dragged from a web page (or from the gallery) arrives as a URL.
    const text = event.dataTransfer.getData('text/uri-list') || event.dataTransfer.getData('text/plain');
    if (text) await addUrl(text.split('\n')[0].trim());
  });
}

async function addFiles(files) {
  for (const file of files) {
    if (!file.type.startsWith('image/')) {
      showError(`${file.name} is not an image.`);
      continue;
    }
    // Sent as a data: URI, which every dialect accepts; the server decodes it like a URL's bytes.
    if (!addRef(await blobToDataUri(file), file.name)) break;
  }
}

function blobToDataUri(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

async function addUrlField() {
  if (await addUrl($('ref-url').value.trim())) $('ref-url').value = '';
}

async function addUrl(url) {
  if (!/^https?:\/\//i.test(url)) {
    showError('Enter an http(s) URL of an image.');
    return false;
  }
  if (new URL(url).origin !== location.origin) return addRef(url, url);
  // This server's own links (results) expire and it refuses to fetch from itself: send the bytes.
  const response = await fetch(url);
  if (!response.ok) {
    showError(`Cannot read ${url} (${response.status}).`);
    return false;
  }
  return addRef(await blobToDataUri(await response.blob()), new URL(url).pathname.split('/').pop());
}

function addRef(src, name) {
  const max = state.config.limits.max_references;
  if (state.refs.length >= max) {
    showError(`At most ${max} reference images are allowed.`);
    return false;
  }
  const ref = { src, name };
  state.refs.push(ref);
  // The natural size is only shown; a URL that does not load is flagged before it is sent.
  const probe = new Image();
  probe.onload = () => {
    Object.assign(ref, { width: probe.naturalWidth, height: probe.naturalHeight });
    renderRefs();
  };
  probe.onerror = () => {
    ref.broken = true;
    renderRefs();
  };
  probe.src = src;
  renderRefs();
  return true;
}

function removeRef(index) {
  state.refs.splice(index, 1);
  renderRefs();
  const items = $('ref-list').children;
  const next = items[Math.min(index, items.length - 1)];
  (next ? next.querySelector('.remove') : $('ref-url')).focus();
}

function moveRef(index, delta) {
  const [ref] = state.refs.splice(index, 1);
  state.refs.splice(index + delta, 0, ref);
  renderRefs();
  // Re-rendering replaced the buttons: keep the keyboard user on the moved image's buttons.
  const item = $('ref-list').children[index + delta];
  const [same, other] = delta < 0 ? ['.earlier', '.later'] : ['.later', '.earlier'];
  (item.querySelector(`${same}:not([disabled])`) || item.querySelector(other)).focus();
}

function renderRefs() {
  const list = $('ref-list');
  const count = state.refs.length;
  // A re-render (say, when an image's size becomes known) must not take the focus away.
  const active = list.contains(document.activeElement) ? document.activeElement : null;
  const focus = active && [[...list.children].indexOf(active.closest('li')), active.className];
  const button = (cls, label, text, onclick, disabled) =>
    el('button', { type: 'button', class: cls, 'aria-label': label, onclick, disabled }, text);
  list.replaceChildren(
    ...state.refs.map((ref, i) => {
      const size = ref.width ? ` ${ref.width}×${ref.height}` : '';
      return el('li', { class: ref.broken ? 'broken' : '' },
        el('img', { src: ref.src, alt: `Reference ${i + 1}: ${ref.name}` }),
        el('span', { class: 'tag' }, `@Image${i + 1}${size}${ref.broken ? ' (does not load)' : ''}`),
        el('span', { class: 'buttons' },
          button('earlier', `Move reference ${i + 1} earlier`, '←', () => moveRef(i, -1), i === 0),
          button('later', `Move reference ${i + 1} later`, '→', () => moveRef(i, 1), i === count - 1),
          button('remove', `Remove reference ${i + 1}`, '×', () => removeRef(i))));
    }),
  );
  if (focus && list.children[focus[0]]) list.children[focus[0]].querySelector(`.${focus[1]}`).focus();
  $('ref-count').textContent = `(${count} of ${state.config.limits.max_references})`;
  update();
}

/* ---------- Generating: queue, events, polling, cancelling ---------- */

async function generate(event) {
  event.preventDefault();
  const settings = readSettings();
  const problem = problemWith(settings);
  if (problem) return showError(problem);
  showError('');
  $('generate').disabled = true;
  const submitted = now();
  try {
    const { generations } = await api('POST', '/api/ai/queue', oxenBody(settings));
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
  for (const [type, data, at] of state.early.get(id) || []) onEvent(type, data, at);
  state.early.delete(id);
  renderCard(card);
}

// The event stream is read with fetch, not EventSource, because EventSource cannot send the
// Authorization header a keyed server needs. Last-Event-ID resumes without losing events.
async function listen() {
  for (;;) {
    state.stream = new AbortController();
    try {
      const headers = authHeaders(state.lastEventId ? { 'Last-Event-ID': state.lastEventId } : {});
      const response = await fetch('/api/events', { headers, signal: state.stream.signal });
      if (response.status === 401) askForKey();
      state.live = response.ok;
      if (response.ok) {
        $('stream-status').textContent = 'Live progress connected.';
        await readEvents(response.body);
      }
    } catch {
      // Dropped or aborted: reconnect below; running cards are polled meanwhile.
    }
    state.live = false;
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
    else if (field === 'id') state.lastEventId = value;
  }
  if (data) onEvent(type, JSON.parse(data), now());
}

function onEvent(type, data, at) {
  const card = state.cards.get(data.generation_id);
  if (!card) {
    // Events can beat the POST's answer, and a new stream replays the last minute: keep a few.
    if (!state.early.has(data.generation_id)) state.early.set(data.generation_id, []);
    state.early.get(data.generation_id).push([type, data, at]);
    if (state.early.size > 200) state.early.delete(state.early.keys().next().value);
    return;
  }
  if (TERMINAL.has(card.status)) return;
  if (type === 'kleinserve.generation.started' || type === 'kleinserve.generation.progress') {
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
async function poll(all = false) {
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
    const wanted = all || card.status === 'queued' || !state.live;
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

// The server names references by its canonical field ("images[0]"); the page says "Reference 1".
function failure(message) {
  return (message || 'The generation failed.').replace(/^images\[(\d+)\]/, (m, i) => `Reference ${Number(i) + 1}`);
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
  $('generate').focus();
}

/* ---------- Result cards, comparison ---------- */

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

function timings(card) {
  const t = card.times;
  const seconds = (ms) => `${(ms / 1000).toFixed(1)} s`;
  const started = t.started ?? t.done;
  return `waited ${seconds(started - t.queued)}, ran ${seconds(t.done - started)}`;
}

function params(card) {
  const s = card.settings;
  const r = card.result;
  const format = s.format === 'png' ? 'png' : `${s.format} (${s.quality})`;
  const shown = { Model: s.model.name, Prompt: s.prompt, References: String(s.refs.length),
    Size: `${r.width}×${r.height}`, Steps: String(s.steps), Guidance: String(s.guidance), Seed: String(r.seed),
    Format: format };
  if (r.safety) shown.Safety = safetyText(r.safety);
  return shown;
}

// The server's safety checker verdict (kleinserve's extension of the queue item).
function safetyText(safety) {
  const score = Math.max(...safety.scores).toFixed(3);
  const verdict = safety.flagged.some(Boolean) ? `flagged (${safety.policy})` : 'passed';
  return `${verdict}, nsfw score ${score}`;
}

function resultParts(card) {
  const r = card.result;
  const pick = (event) => {
    card.selected = event.target.checked;
    $('compare').disabled = [...state.cards.values()].filter((c) => c.selected).length < 2;
  };
  const table = Object.entries(params(card)).map(([name, value]) => [el('dt', {}, name), el('dd', {}, value)]);
  const alt = `Result: ${card.settings.prompt} (seed ${r.seed})`;
  return [
    el('a', { href: r.url, target: '_blank', rel: 'noopener' }, el('img', { src: r.url, alt })),
    el('dl', { class: 'params' }, table.flat()),
    el('div', { class: 'buttons' },
      el('label', { class: 'pick' }, el('input', { type: 'checkbox', onchange: pick }), ' Compare'),
      el('a', { class: 'button', href: r.url, download: `kleinserve-${r.seed}.${ext(card.settings.format)}` },
        'Download'),
      el('button', { type: 'button', onclick: () => setSeed(r.seed) }, 'Reuse seed'),
      el('button', { type: 'button', onclick: () => addUrl(new URL(r.url, location.href).href) }, 'Edit this image')),
  ];
}

// Side by side, one column per result; rows whose values differ are marked (colour and a sign).
function showComparison() {
  const picked = [...state.cards.values()].filter((c) => c.selected && c.result);
  const box = $('comparison');
  if (picked.length < 2) return void (box.hidden = true);
  const rows = picked.map(params);
  const image = (c, i) => el('img', { src: c.result.url, alt: `Compared result ${i + 1}, seed ${c.result.seed}` });
  const head = el('tr', {}, el('th', { scope: 'col' }, 'Parameter'),
    picked.map((c, i) => el('th', { scope: 'col' }, image(c, i))));
  const body = Object.keys(rows[0]).map((name) => {
    const differs = new Set(rows.map((row) => row[name])).size > 1;
    return el('tr', { class: differs ? 'differs' : '' },
      el('th', { scope: 'row' }, differs ? `≠ ${name}` : name), rows.map((row) => el('td', {}, row[name])));
  });
  box.replaceChildren(
    el('div', { class: 'row' }, el('h2', {}, `Comparing ${picked.length} results`),
      el('button', { type: 'button', onclick: () => (box.hidden = true) }, 'Close comparison')),
    el('div', { class: 'scroll' }, el('table', {}, el('thead', {}, head), el('tbody', {}, body))),
  );
  box.hidden = false;
  box.scrollIntoView({ block: 'nearest' });
}

/* ---------- Tabs ---------- */

function wireTabs() {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  for (const tab of tabs) {
    tab.addEventListener('click', () => showTab(tab.id));
    // Arrow keys move between tabs, as the ARIA tabs pattern expects.
    tab.addEventListener('keydown', (event) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
      if (!step) return;
      const next = tabs[(tabs.indexOf(tab) + step + tabs.length) % tabs.length];
      showTab(next.id);
      next.focus();
    });
  }
}

function showTab(id) {
  for (const tab of document.querySelectorAll('[role="tab"]')) {
    const selected = tab.id === id;
    tab.setAttribute('aria-selected', String(selected));
    tab.tabIndex = selected ? 0 : -1;
    $(tab.getAttribute('aria-controls')).hidden = !selected;
  }
}

/* ---------- The API tab: the current settings as each dialect's exact request ---------- */

const baseUrl = () => (state.config.public_url || location.origin).replace(/\/+$/, '');
const ext = (format) => (format === 'jpeg' ? 'jpg' : format);
const shellQuote = (text) => `'${text.replace(/'/g, `'\\''`)}'`;
const pyString = (text) => JSON.stringify(text);

// JSON as a Python literal: the same text but for true, false and null outside strings.
function pyLiteral(value) {
  const words = { true: 'True', false: 'False', null: 'None' };
  return JSON.stringify(value, null, 4).replace(/("(?:[^"\\]|\\.)*")|\b(true|false|null)\b/g,
    (match, string, word) => string || words[word]);
}

// The key is a placeholder (an environment variable) unless the user asks to see it in the code.
function keyParts() {
  const reveal = $('reveal-key').checked && apiKey();
  return {
    curl: (header, scheme = '') =>
      reveal ? shellQuote(`${header}: ${scheme}${apiKey()}`) : `"${header}: ${scheme}$KLEINSERVE_API_KEY"`,
    python: reveal
      ? `API_KEY = ${pyString(apiKey())}`
      : 'API_KEY = os.environ.get("KLEINSERVE_API_KEY", "YOUR_API_KEY")  # an open server takes any',
  };
}

// The body goes through a quoted here-document: no shell expansion and no argument-length limit
// (data: URIs of photos are megabytes).
function curl(path, header, body, output) {
  return [
    `curl -sS --fail-with-body -X POST ${shellQuote(baseUrl() + path)} \\`,
    `  -H ${header} \\`,
    '  -H "Content-Type: application/json" \\',
    `  --data-binary @-${output ? ` -o ${output}` : ''} <<'JSON'`,
    JSON.stringify(body, null, 2),
    'JSON',
  ].join('\n');
}

function oxenCurl(s) {
  const path = s.refs.length ? '/api/ai/images/edit' : '/api/ai/images/generate';
  const note = '# The sync endpoint; POST /api/ai/queue (what the Workbench uses) takes the same body.';
  return { code: `${note}\n${curl(path, keyParts().curl('Authorization', 'Bearer '), oxenBody(s))}` };
}

function oxenPython(s) {
  const code = `import os
import time

import requests

BASE = ${pyString(baseUrl())}
${keyParts().python}
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
body = ${pyLiteral(oxenBody(s))}

queued = requests.post(f"{BASE}/api/ai/queue", json=body, headers=HEADERS, timeout=60)
queued.raise_for_status()
for n, generation in enumerate(queued.json()["generations"]):
    while True:  # or listen to GET /api/events (SSE) for progress and completion
        url = f"{BASE}/api/ai/queue/{generation['generation_id']}"
        item = requests.get(url, headers=HEADERS, timeout=60).json()
        if item["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.5)
    if item["status"] != "succeeded":
        raise RuntimeError(f"generation {item['status']}: {item['error_message']}")
    with open(f"oxen-{n}.${ext(s.format)}", "wb") as file:
        file.write(requests.get(item["result_url"], timeout=60).content)
    print(f"oxen-{n}.${ext(s.format)}", "seed", item["seed"])
`;
  return { code };
}

function openaiPython(s) {
  const args = [`model=${pyString(s.model.openai)}`, `prompt=${pyString(s.prompt)}`];
  // The SDK uploads files as multipart: a data: URI becomes its bytes, a URL is downloaded first.
  const files = s.refs.map((src, i) => {
    const data = src.match(/^data:([^;,]+)[^,]*;base64,(.*)$/);
    if (!data) return `("reference-${i + 1}", urllib.request.urlopen(${pyString(src)}).read())`;
    const [type, b64] = [data[1], data[2]];
    return `("reference-${i + 1}.${type.split('/')[1]}", base64.b64decode(${pyString(b64)}), ${pyString(type)})`;
  });
  if (files.length) args.push(`image=[\n        ${files.join(',\n        ')},\n    ]`);
  args.push(`n=${s.count}`, `size="${s.width}x${s.height}"`, `output_format=${pyString(s.format)}`);
  if (s.format !== 'png') args.push(`output_compression=${QUALITY[s.quality]}`);
  args.push('response_format="b64_json"');
  const extra = {};
  if (s.seed !== null) extra.seed = s.seed;
  if (!s.model.distilled) Object.assign(extra, { num_inference_steps: s.steps, guidance_scale: s.guidance });
  if (Object.keys(extra).length) args.push(`extra_body=${pyLiteral(extra).replace(/\n/g, '\n    ')}`);
  const code = `import base64
import os
${files.some((f) => f.includes('urllib')) ? 'import urllib.request\n' : ''}
from openai import OpenAI

${keyParts().python}
client = OpenAI(base_url=${pyString(`${baseUrl()}/v1`)}, api_key=API_KEY)
result = client.images.${files.length ? 'edit' : 'generate'}(
    ${args.join(',\n    ')},
)
for n, image in enumerate(result.data):
    with open(f"openai-{n}.${ext(s.format)}", "wb") as file:
        file.write(base64.b64decode(image.b64_json))
print("seed of image 0:", getattr(result, "seed", None))  # kleinserve adds the seed
`;
  return { code };
}

// 1min.ai has no free size, one input image, no guidance and one image per call: say what differs.
function oneminCurl(s) {
  const notes = [];
  const prompt = { prompt: s.prompt };
  if (s.refs.length) prompt.imageUrl = s.refs[0];
  if (s.refs.length > 1) notes.push(`1min.ai takes one input image: only reference 1 of ${s.refs.length} is sent.`);
  const [ratio, mp] = nearestOneminSize(s.width, s.height);
  const [w, h] = state.config.sizes[ratio][mp];
  if (w !== s.width || h !== s.height) {
    notes.push(`1min.ai sizes come from aspect_ratio × megapixels: ${s.width}×${s.height} is not one; ` +
      `nearest is ${ratio} at ${mp} MP (${w}×${h}).`);
  }
  Object.assign(prompt, { aspect_ratio: ratio, megapixels: mp });
  if (!s.model.distilled) {
    prompt.num_inference_steps = s.steps;
    if (s.guidance !== s.model.guidance) notes.push(`1min.ai has no guidance: the server uses ${s.model.guidance}.`);
  }
  if (s.seed !== null) prompt.seed = s.seed;
  prompt.output_format = s.format;
  if (s.format !== 'png') prompt.output_quality = QUALITY[s.quality];
  if (s.count > 1) notes.push(`1min.ai makes one image per call: this is image 1 of ${s.count}.`);
  const type = s.refs.length ? 'IMAGE_EDITOR' : 'IMAGE_GENERATOR';
  const body = { type, model: s.model.onemin, promptObject: prompt };
  const lead = "# The answer's aiRecord.temporaryUrl is the image.";
  return { code: `${lead}\n${curl('/api/features', keyParts().curl('API-KEY'), body)}`, notes };
}

function nearestOneminSize(width, height) {
  let best = null;
  for (const ratio of ONEMIN_RATIOS) {
    for (const mp of ONEMIN_MP) {
      const [w, h] = state.config.sizes[ratio][mp];
      // The shape matters more than the pixel count: a wrong ratio crops, a wrong size only scales.
      const distance =
        10 * Math.abs(Math.log(w / h / (width / height))) + Math.abs(Math.log((w * h) / (width * height)));
      if (!best || distance < best[0]) best = [distance, ratio, mp];
    }
  }
  return best.slice(1);
}

function verdaCurl(s) {
  const notes = [];
  const body = { prompt: s.prompt, width: s.width, height: s.height };
  if (!s.model.distilled) Object.assign(body, { num_steps: s.steps, guidance: s.guidance });
  if (s.seed !== null) body.seed = s.seed;
  if (s.refs.length) body.input_images = s.refs;
  body.output_format = s.format; // Verda's default is jpeg
  if (s.format !== 'png') body.output_quality = QUALITY[s.quality];
  if (s.count > 1) notes.push(`Verda makes one image per call: this is image 1 of ${s.count}.`);
  const header = keyParts().curl('Authorization', 'Bearer ');
  return { code: curl(`/${s.model.verda}/generate`, header, body, `verda.${ext(s.format)}`), notes };
}

const SNIPPETS = { 'oxen-curl': oxenCurl, 'oxen-python': oxenPython, 'openai-python': openaiPython,
  'onemin-curl': oneminCurl, 'verda-curl': verdaCurl };

const currentSnippet = () => SNIPPETS[$('dialect').value](readSettings());

function renderSnippet() {
  if (!state.config) return;
  const { code, notes = [] } = currentSnippet();
  // On screen only: a photo's base64 would be megabytes of text. Copy takes the full code.
  const shown = code.replace(/([A-Za-z0-9+/]{48})([A-Za-z0-9+/]{80,}={0,2})/g,
    (match, head, rest) => `${head}…(${rest.length} more characters)`);
  if (shown !== code) notes.push('Long base64 data is shortened on screen; Copy copies it in full.');
  $('snippet-note').textContent = notes.join(' ');
  $('snippet').textContent = shown;
}

async function copySnippet() {
  const { code } = currentSnippet();
  // Cleared first, so "Copied." always means this copy has landed, never an earlier one.
  $('copy-status').textContent = '';
  try {
    await navigator.clipboard.writeText(code);
  } catch {
    // No clipboard API (plain http on a LAN address is not a secure context): the old way.
    const area = el('textarea', { class: 'visually-hidden' }, code);
    document.body.append(area);
    area.select();
    document.execCommand('copy');
    area.remove();
  }
  $('copy-status').textContent = 'Copied.';
  // One timer at a time: an earlier copy's timer must not blank this copy's message.
  clearTimeout(copySnippet.timer);
  copySnippet.timer = setTimeout(() => ($('copy-status').textContent = ''), 2000);
}

document.addEventListener('DOMContentLoaded', start);
