// Reference images: files, drops and URLs, in prompt order (@Image1, @Image2, ...).

import { $, blobToDataUri, el, on, showError } from './dom.js';
import { closeMaskEditor, openMaskEditor } from './mask.js';
import { currentMask, state, update } from './settings.js';

export function wireReferences() {
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

async function addUrlField() {
  if (await addUrl($('ref-url').value.trim())) $('ref-url').value = '';
}

export async function addUrl(url) {
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
  // The natural size is only shown (and sizes the mask); a URL that does not load is flagged before it is sent.
  const probe = new Image();
  probe.onload = () => {
    Object.assign(ref, { width: probe.naturalWidth, height: probe.naturalHeight, image: probe });
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

export function renderRefs() {
  const list = $('ref-list');
  const count = state.refs.length;
  if (!count || (state.mask && state.mask.ref !== state.refs[0])) closeMaskEditor();
  // A re-render (say, when an image's size becomes known) must not take the focus away.
  const active = list.contains(document.activeElement) ? document.activeElement : null;
  const focus = active && [[...list.children].indexOf(active.closest('li')), active.className];
  const button = (cls, label, text, onclick, disabled) =>
    el('button', { type: 'button', class: cls, 'aria-label': label, onclick, disabled }, text);
  const masked = currentMask();
  list.replaceChildren(
    ...state.refs.map((ref, i) => {
      const size = ref.width ? ` ${ref.width}×${ref.height}` : '';
      const mask = i === 0 && ref.width
        ? button('mask', 'Paint a mask on reference 1', masked ? 'Mask ✓' : 'Mask', () => openMaskEditor(ref))
        : null;
      return el('li', { class: ref.broken ? 'broken' : '' },
        el('img', { src: ref.src, alt: `Reference ${i + 1}: ${ref.name}` }),
        el('span', { class: 'tag' }, `@Image${i + 1}${size}${ref.broken ? ' (does not load)' : ''}`),
        el('span', { class: 'buttons' },
          button('earlier', `Move reference ${i + 1} earlier`, '←', () => moveRef(i, -1), i === 0),
          button('later', `Move reference ${i + 1} later`, '→', () => moveRef(i, 1), i === count - 1),
          button('remove', `Remove reference ${i + 1}`, '×', () => removeRef(i)),
          mask));
    }),
  );
  if (focus && list.children[focus[0]]) {
    const again = list.children[focus[0]].querySelector(`.${focus[1].split(' ')[0]}`);
    if (again) again.focus();
  }
  $('ref-count').textContent = `(${count} of ${state.config.limits.max_references})`;
  update();
}
