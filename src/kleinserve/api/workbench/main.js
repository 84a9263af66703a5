// kleinserve Workbench: try the models, compare results, copy the exact API call.
//
// Native ES modules with no dependencies and no build step, so the page ships as package data and
// works offline. It talks to the server only through public APIs: GET /workbench/config for what the
// Oxen API does not say (ids, limits, the size table, optional features), POST /workbench/snippet for
// each dialect's request for the current settings, GET /v1/loras, then the Oxen queue
// (POST /api/ai/queue, GET and DELETE /api/ai/queue/{id}) and its SSE stream (GET /api/events).
//
// Modules: dom (helpers), api (fetch and the key), settings (state, controls, the canonical request),
// references, mask (painting), loras (the adapter picker), jobs (queue, events, cards), compare,
// snippets (the API tab), tabs; this one starts them.

import { api, apiKey, askForKey, onKeyChange, saveKey } from './api.js';
import { $, on, showError, sleep } from './dom.js';
import { showComparison } from './compare.js';
import { generate, listen, poll, POLL_MS } from './jobs.js';
import { loadLoras } from './loras.js';
import { wireMask } from './mask.js';
import { wireReferences } from './references.js';
import { applyConfig, onModelChange, randomSeed, setSeed, state, update } from './settings.js';
import { wireSnippets } from './snippets.js';
import { wireTabs } from './tabs.js';

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
  if (state.config.auth_required && !apiKey()) askForKey();
  loadLoras();
  onKeyChange(loadLoras);
  listen();
  poll(); // at once: says whether the models are still loading
  setInterval(poll, POLL_MS);
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
  wireReferences();
  wireMask();
  wireTabs();
  wireSnippets();
}

start();
