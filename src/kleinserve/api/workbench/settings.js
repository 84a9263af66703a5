// The page's state, the server's configuration, and the current settings as a canonical request.

import { $, el, settingsChanged } from './dom.js';

const QUALITY = { standard: 90, high: 100 }; // the quality control's names, as encoder qualities

export const state = {
  config: null,
  refs: [], // {src, name, width, height}: src is a data: URI or an http(s) URL, sent as it is
  mask: null, // {ref, canvas}: painted over refs[0] (mask.js)
  loras: [], // [{name, scale}]: the adapters ticked in the LoRA panel (loras.js)
  cards: new Map(), // generation_id -> card (one per queued generation)
};

export const model = () => state.config.models.find((m) => m.id === $('model').value) || state.config.models[0];
export const feature = (name) => Boolean(state.config && state.config.features && state.config.features[name]);

export function applyConfig(config) {
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
  $('live-preview-row').hidden = !feature('previews');
  onModelChange();
}

// Distilled variants run their fixed steps and guidance (Verda refuses any other value; the
// others would accept it, but the model was distilled for exactly these). Base variants are free.
export function onModelChange() {
  const m = model();
  $('steps').value = m.steps;
  $('guidance').value = m.guidance;
  $('steps').disabled = $('guidance').disabled = m.distilled;
  $('sampling-note').textContent = m.distilled
    ? `${m.name} is step- and guidance-distilled: ${m.steps} steps and guidance ${m.guidance} are fixed.`
    : `${m.name} runs true classifier-free guidance; default ${m.steps} steps, guidance ${m.guidance}.`;
  update();
}

export const randomSeed = () => crypto.getRandomValues(new Uint32Array(1))[0];

export function setSeed(seed) {
  $('seed-lock').checked = true;
  $('seed').value = seed;
  update();
}

const pixelMode = () => document.querySelector('input[name="size-mode"]:checked').value === 'pixels';

function currentSize() {
  if (pixelMode()) return { width: Number($('width').value), height: Number($('height').value) };
  const [width, height] = state.config.sizes[$('ratio').value][$('mp').value];
  return { width, height };
}

// The mask, if one is painted on the current first reference (moving or removing it drops the mask).
export const currentMask = () =>
  state.mask && state.mask.painted && state.refs[0] === state.mask.ref ? state.mask : null;

export function readSettings() {
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
    loras: state.loras.map((lora) => ({ ...lora })),
    masked: Boolean(currentMask()) && feature('mask'),
    preview: feature('previews') && $('live-preview').checked,
  };
}

// The settings as kleinserve's canonical request (GenerationRequest): the server turns it into each
// dialect's wire format (POST /workbench/snippet), so no wire format is encoded here.
export function canonical(s, mask = null) {
  const request = { model: s.model.id, prompt: s.prompt };
  if (s.refs.length) request.images = s.refs;
  // Inpainting keeps the first reference's size: a masked request names none.
  if (mask && feature('mask')) request.mask = mask;
  else Object.assign(request, { width: s.width, height: s.height });
  // A distilled variant's fixed steps and guidance are its defaults: left out, the snippets stay short.
  if (!s.model.distilled) Object.assign(request, { steps: s.steps, guidance: s.guidance });
  if (s.seed !== null) request.seed = s.seed;
  if (s.count > 1) request.num_images = s.count;
  request.output_format = s.format;
  if (s.format !== 'png') request.quality = QUALITY[s.quality];
  if (s.loras.length) request.loras = s.loras;
  if (s.preview) request.previews = s.steps; // one preview per step
  return request;
}

// What the server would refuse, said before sending (the server checks again).
export function problemWith(s) {
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

export function update() {
  $('size-ratio').hidden = pixelMode();
  $('size-pixels').hidden = !pixelMode();
  $('seed').disabled = !$('seed-lock').checked;
  $('quality').disabled = $('format').value === 'png';
  if (!state.config) return;
  const size = currentSize();
  $('size-note').textContent = currentMask() && feature('mask')
    ? 'With a mask, the result keeps the size of @Image1.'
    : `${size.width} × ${size.height} pixels`;
  settingsChanged();
}
