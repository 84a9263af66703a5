// Mask painting on the first reference: OpenAI's semantics, the painted area becomes fully
// transparent (alpha 0) in a PNG of the reference's size, and that is the area the model edits.

import { $, on } from './dom.js';
import { currentMask, feature, state, update } from './settings.js';

let drawing = null; // the last point of the stroke being drawn, in canvas pixels

export function wireMask() {
  const canvas = $('mask-canvas');
  canvas.addEventListener('pointerdown', (event) => {
    canvas.setPointerCapture(event.pointerId);
    drawing = point(event);
    stroke(drawing, drawing);
  });
  canvas.addEventListener('pointermove', (event) => {
    if (!drawing) return;
    const next = point(event);
    stroke(drawing, next);
    drawing = next;
  });
  for (const type of ['pointerup', 'pointercancel']) {
    canvas.addEventListener(type, () => {
      if (!drawing) return;
      drawing = null;
      painted();
    });
  }
  on('mask-clear', 'click', () => {
    canvas.getContext('2d').clearRect(0, 0, canvas.width, canvas.height);
    painted();
  });
  on('mask-done', 'click', () => {
    closeMaskEditor();
    const button = document.querySelector('#ref-list .mask');
    if (button) button.focus();
  });
}

// Opens the editor on ``ref`` (the first reference), keeping what was painted on it before.
export function openMaskEditor(ref) {
  const canvas = $('mask-canvas');
  if (!state.mask || state.mask.ref !== ref) {
    Object.assign(canvas, { width: ref.width, height: ref.height });
    state.mask = { ref, canvas, painted: false };
  }
  $('mask-image').src = ref.src;
  $('mask-note').textContent = feature('mask')
    ? 'Paint the area to change; the rest of @Image1 is kept.'
    : 'This server does not take masks yet: the mask is painted but not sent.';
  $('mask-editor').hidden = false;
  $('mask-editor').scrollIntoView({ block: 'nearest' });
}

export function closeMaskEditor() {
  $('mask-editor').hidden = true;
  if (state.mask && state.mask.ref !== state.refs[0]) state.mask = null;
}

function point(event) {
  const canvas = $('mask-canvas');
  const box = canvas.getBoundingClientRect();
  return {
    x: ((event.clientX - box.left) * canvas.width) / box.width,
    y: ((event.clientY - box.top) * canvas.height) / box.height,
  };
}

function stroke(from, to) {
  const canvas = $('mask-canvas');
  const ctx = canvas.getContext('2d');
  const erase = document.querySelector('input[name="mask-mode"]:checked').value === 'erase';
  ctx.globalCompositeOperation = erase ? 'destination-out' : 'source-over';
  // The brush is a share of the image's longer side, so it feels the same on any image size.
  ctx.lineWidth = (Number($('mask-brush').value) / 100) * Math.max(canvas.width, canvas.height);
  Object.assign(ctx, { lineCap: 'round', lineJoin: 'round', strokeStyle: '#ff2d2d' });
  ctx.beginPath();
  ctx.moveTo(from.x, from.y);
  ctx.lineTo(to.x + 0.01, to.y); // a zero-length line draws nothing: a click still paints a dot
  ctx.stroke();
}

// Whether anything is painted now; the reference's button and the request follow.
function painted() {
  const canvas = $('mask-canvas');
  const alpha = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let any = false;
  for (let i = 3; i < alpha.length && !any; i += 4) any = alpha[i] > 0;
  if (state.mask) state.mask.painted = any;
  const button = document.querySelector('#ref-list .mask');
  if (button) button.textContent = any ? 'Mask ✓' : 'Mask';
  update();
}

// The mask as a PNG data URI: opaque black, fully transparent where painted. The painted strokes
// are cut out of an opaque image ('destination-out'), so painted pixels get alpha 0.
export function encodeMask(paint) {
  const out = document.createElement('canvas');
  Object.assign(out, { width: paint.width, height: paint.height });
  const ctx = out.getContext('2d');
  ctx.fillStyle = '#000';
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.globalCompositeOperation = 'destination-out';
  ctx.drawImage(paint, 0, 0);
  return out.toDataURL('image/png');
}

// The mask of the current first reference, or null when none is painted.
export function maskDataUri() {
  const mask = currentMask();
  return mask ? encodeMask(mask.canvas) : null;
}
