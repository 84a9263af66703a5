// The LoRA adapter picker: the adapters GET /v1/loras offers, each with a scale; the ticked ones go
// in the request's `loras`. Hidden when the server offers none.

import { api } from './api.js';
import { $, el } from './dom.js';
import { state, update } from './settings.js';

let offered = [];

export async function loadLoras() {
  try {
    const answer = await api('GET', '/v1/loras');
    offered = answer.data.map((item) => item.name);
    $('lora-limit').textContent = `up to ${answer.max_per_request} per request`;
  } catch {
    offered = []; // an older server, or a key is needed first: loaded again when one is saved
  }
  render();
}

function render() {
  const box = $('lora-list');
  box.replaceChildren(...offered.map((name, i) => {
    const id = `lora-${i}`;
    const scale = el('input', { type: 'range', id: `${id}-scale`, min: -2, max: 2, step: 0.05, value: 1,
      'aria-label': `Scale of ${name}` });
    const shown = el('output', { for: `${id}-scale` }, '1.00');
    const use = el('input', { type: 'checkbox', id, value: name });
    const changed = () => {
      shown.textContent = Number(scale.value).toFixed(2);
      scale.disabled = !use.checked;
      collect();
    };
    scale.addEventListener('input', changed);
    use.addEventListener('change', changed);
    scale.disabled = true;
    return el('li', {}, el('label', { for: id }, use, ` ${name}`), scale, shown);
  }));
  $('loras').hidden = offered.length === 0;
  collect();
}

function collect() {
  state.loras = [...$('lora-list').querySelectorAll('li')]
    .map((item) => item.querySelectorAll('input'))
    .filter(([use]) => use.checked)
    .map(([use, scale]) => ({ name: use.value, scale: Number(scale.value) }));
  update();
}
