// The API tab: the current settings as each dialect's exact request, rendered as curl and Python.
//
// The requests come from the server (POST /workbench/snippet: each dialect's own example for the
// settings, as method, path, headers and JSON body); this module only prints them, generically.

import { apiKey } from './api.js';
import { $, el, onSettingsChange } from './dom.js';
import { requestsFor } from './jobs.js';
import { ext } from './compare.js';
import { readSettings, state } from './settings.js';
import { onTabShown } from './tabs.js';

let examples = []; // the latest answer's examples
let asked = 0; // the number of the latest request, so a slow older answer never overwrites a newer one
let timer = null;
let dirty = true; // the settings changed since the examples shown were asked for
let placeholder = false; // the prompt is empty: the examples use the placeholder prompt

export function wireSnippets() {
  $('dialect').addEventListener('change', render);
  $('reveal-key').addEventListener('change', render);
  $('copy').addEventListener('click', copySnippet);
  onSettingsChange(refresh);
  onTabShown((id) => id === 'tab-api' && refresh());
}

// Asks the server again (debounced) while the API tab is open; references make the body large.
function refresh() {
  dirty = true;
  if (!state.config || $('api').hidden) return;
  clearTimeout(timer);
  timer = setTimeout(load, 150);
}

// Without a prompt yet, the snippets show the prompt box's placeholder (and say so). Live previews
// are the page's own view of a running job, not part of the image asked for: left out here.
function settingsToShow() {
  const settings = { ...readSettings(), preview: false };
  placeholder = !settings.prompt.trim();
  if (placeholder) settings.prompt = $('prompt').placeholder;
  return settings;
}

async function load() {
  const number = ++asked;
  try {
    const answer = await requestsFor(settingsToShow());
    if (number !== asked) return;
    examples = answer.examples;
    dirty = false;
    fillChoices();
    render();
  } catch (err) {
    if (number !== asked) return;
    $('snippet-note').textContent = `These settings are not a valid request: ${err.message}`;
    $('snippet').textContent = '';
  }
}

const label = (example) => example.title.split(':')[0];

function fillChoices() {
  const select = $('dialect');
  const wanted = examples.flatMap((e) => [[`${e.dialect}:curl`, `${label(e)} cURL`],
    [`${e.dialect}:python`, `${label(e)} Python`]]);
  if ([...select.options].map((o) => o.value).join() === wanted.map(([value]) => value).join()) return;
  const chosen = select.value;
  select.replaceChildren(...wanted.map(([value, text]) => el('option', { value, selected: value === chosen }, text)));
}

function current() {
  const [dialect, language] = ($('dialect').value || 'oxen:curl').split(':');
  const example = examples.find((e) => e.dialect === dialect);
  if (!example) return null;
  const code = language === 'python' ? python(example) : curl(example);
  const notes = [...example.notes];
  if (placeholder) notes.unshift('(An example prompt: write yours in Prompt.)');
  if (!example.served) notes.unshift(`${label(example)} has no id for ${readSettings().model.name}; this shows the shape.`);
  return { code, notes };
}

function render() {
  const snippet = current();
  if (!snippet) return;
  const { code, notes } = snippet;
  // On screen only: a photo's base64 would be megabytes of text. Copy takes the full code.
  const shown = code.replace(/([A-Za-z0-9+/]{48})([A-Za-z0-9+/]{80,}={0,2})/g,
    (match, head, rest) => `${head}…(${rest.length} more characters)`);
  if (shown !== code) notes.push('Long base64 data is shortened on screen; Copy copies it in full.');
  $('snippet-note').textContent = notes.join(' ');
  $('snippet').textContent = shown;
}

const baseUrl = () => (state.config.public_url || location.origin).replace(/\/+$/, '');
const shellQuote = (text) => `'${text.replace(/'/g, `'\\''`)}'`;
const pyString = (text) => JSON.stringify(text);
const output = (example) => `${example.dialect}.${ext(readSettings().format)}`;

// JSON as a Python literal: the same text but for true, false and null outside strings.
function pyLiteral(value) {
  const words = { true: 'True', false: 'False', null: 'None' };
  return JSON.stringify(value, null, 4).replace(/("(?:[^"\\]|\\.)*")|\b(true|false|null)\b/g,
    (match, string, word) => string || words[word]);
}

// The key is a placeholder (an environment variable) unless the user asks to see it in the code.
const revealed = () => ($('reveal-key').checked && apiKey()) || null;

// The body goes through a quoted here-document: no shell expansion and no argument-length limit
// (data: URIs of photos are megabytes).
function curl(example) {
  const key = revealed();
  const auth = key
    ? shellQuote(`${example.auth_header}: ${example.auth_scheme}${key}`)
    : `"${example.auth_header}: ${example.auth_scheme}$KLEINSERVE_API_KEY"`;
  const headers = Object.entries(example.headers).map(([name, value]) => `  -H ${shellQuote(`${name}: ${value}`)} \\`);
  const save = example.response === 'image' ? ` -o ${output(example)}` : '';
  return [
    `curl -sS --fail-with-body -X ${example.method} ${shellQuote(baseUrl() + example.path)} \\`,
    `  -H ${auth} \\`,
    ...headers,
    '  -H "Content-Type: application/json" \\',
    `  --data-binary @-${save} <<'JSON'`,
    JSON.stringify(example.body, null, 2),
    'JSON',
  ].join('\n');
}

function python(example) {
  const key = revealed();
  const keyLine = key
    ? `API_KEY = ${pyString(key)}`
    : 'API_KEY = os.environ.get("KLEINSERVE_API_KEY", "YOUR_API_KEY")  # an open server takes any';
  const headers = { [example.auth_header]: `${example.auth_scheme}{API_KEY}`, ...example.headers };
  const headerLines = Object.entries(headers).map(([name, value]) =>
    `    ${pyString(name)}: ${name === example.auth_header ? `f${pyString(value)}` : pyString(value)},`);
  const answer = example.response === 'image'
    ? `with open(${pyString(output(example))}, "wb") as file:\n    file.write(response.content)`
    : 'print(json.dumps(response.json(), indent=2))';
  return `import json
import os

import requests

BASE = ${pyString(baseUrl())}
${keyLine}
headers = {
${headerLines.join('\n')}
}
body = ${pyLiteral(example.body)}

response = requests.request(${pyString(example.method)}, BASE + ${pyString(example.path)}, json=body, headers=headers, timeout=300)
response.raise_for_status()
${answer}
`;
}

async function copySnippet() {
  // Cleared first (before any wait for the server), so "Copied." always means this copy has
  // landed, never an earlier one.
  $('copy-status').textContent = '';
  if (dirty) {
    clearTimeout(timer); // copy what the settings are now, not what they were
    await load();
  }
  const snippet = current();
  if (!snippet) return;
  const { code } = snippet;
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
