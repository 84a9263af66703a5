// Small DOM helpers shared by every module.

export const $ = (id) => document.getElementById(id);
export const on = (id, type, handler) => $(id).addEventListener(type, handler);
export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
export const now = () => performance.now();

// A small element builder: el('button', {type: 'button', onclick: f}, 'text').
export function el(tag, attrs = {}, ...children) {
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

export function showError(message) {
  $('error-text').textContent = message;
  $('error').hidden = !message;
}

export function blobToDataUri(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

// Listeners for "the settings changed" (the API tab re-renders, say), so modules need not import each other.
const changeListeners = [];
export const onSettingsChange = (listener) => changeListeners.push(listener);
export const settingsChanged = () => changeListeners.forEach((listener) => listener());
