// A result's parameters, its buttons, and the side-by-side comparison of picked results.

import { $, el } from './dom.js';
import { addUrl } from './references.js';
import { setSeed, state } from './settings.js';

export const ext = (format) => (format === 'jpeg' ? 'jpg' : format);

export function params(card) {
  const s = card.settings;
  const r = card.result;
  const format = s.format === 'png' ? 'png' : `${s.format} (${s.quality})`;
  const shown = { Model: s.model.name, Prompt: s.prompt, References: String(s.refs.length),
    Size: `${r.width}×${r.height}`, Steps: String(s.steps), Guidance: String(s.guidance), Seed: String(r.seed),
    Format: format };
  if (s.masked) shown.Mask = 'painted on @Image1';
  if (s.loras.length) shown.LoRA = s.loras.map((lora) => `${lora.name} ${lora.scale.toFixed(2)}`).join(', ');
  if (r.safety) shown.Safety = safetyText(r.safety);
  return shown;
}

// The server's safety checker verdict (kleinserve's extension of the queue item).
function safetyText(safety) {
  const score = Math.max(...safety.scores).toFixed(3);
  const verdict = safety.flagged.some(Boolean) ? `flagged (${safety.policy})` : 'passed';
  return `${verdict}, nsfw score ${score}`;
}

export const updateCompare = () => {
  $('compare').disabled = [...state.cards.values()].filter((c) => c.selected).length < 2;
};

export function resultParts(card) {
  const r = card.result;
  const pick = (event) => {
    card.selected = event.target.checked;
    updateCompare();
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
export function showComparison() {
  const picked = [...state.cards.values()].filter((c) => c.selected && c.result);
  const box = $('comparison');
  if (picked.length < 2) return void (box.hidden = true);
  const rows = picked.map(params);
  const names = [...new Set(rows.flatMap((row) => Object.keys(row)))];
  const image = (c, i) => el('img', { src: c.result.url, alt: `Compared result ${i + 1}, seed ${c.result.seed}` });
  const head = el('tr', {}, el('th', { scope: 'col' }, 'Parameter'),
    picked.map((c, i) => el('th', { scope: 'col' }, image(c, i))));
  const body = names.map((name) => {
    const differs = new Set(rows.map((row) => row[name] ?? '—')).size > 1;
    return el('tr', { class: differs ? 'differs' : '' },
      el('th', { scope: 'row' }, differs ? `≠ ${name}` : name), rows.map((row) => el('td', {}, row[name] ?? '—')));
  });
  box.replaceChildren(
    el('div', { class: 'row' }, el('h2', {}, `Comparing ${picked.length} results`),
      el('button', { type: 'button', onclick: () => (box.hidden = true) }, 'Close comparison')),
    el('div', { class: 'scroll' }, el('table', {}, el('thead', {}, head), el('tbody', {}, body))),
  );
  box.hidden = false;
  box.scrollIntoView({ block: 'nearest' });
}
