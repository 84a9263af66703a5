// Talking to the server: fetch with the API key, and error bodies read as sentences.

import { $, showError, settingsChanged } from './dom.js';

const KEY_STORE = 'kleinserve.apiKey';
const WHY = { 401: 'This server needs an API key (enter it under “API key”)', 402: 'Out of credits',
  403: 'Not allowed', 413: 'The request is too large', 429: 'Too many requests',
  503: 'The server cannot take this now' };

export const apiKey = () => localStorage.getItem(KEY_STORE) || '';

export function authHeaders(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

export async function api(method, path, body) {
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
    const error = new Error(readableError(response, data, text));
    error.status = response.status;
    throw error;
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

export function askForKey() {
  $('settings').open = true;
  $('key-status').textContent = apiKey()
    ? 'The server refused this key: check it, or ask for a new one.'
    : 'This server needs an API key.';
  $('api-key').focus();
}

const keyListeners = [];
export const onKeyChange = (listener) => keyListeners.push(listener);

export function saveKey(key) {
  if (key) localStorage.setItem(KEY_STORE, key);
  else localStorage.removeItem(KEY_STORE);
  $('api-key').value = key;
  $('key-status').textContent = key ? 'Saved in this browser.' : 'Forgotten.';
  showError('');
  keyListeners.forEach((listener) => listener(key));
  settingsChanged();
}
