// Building blocks every page uses: elements made without innerHTML (API
// text is never parsed as markup), formats, pills, dialogs and toasts.

/** An element: h('td', {class: 'num'}, 'text', child, ...). */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k === 'style' && typeof v === 'object') Object.assign(el.style, v);
    else if (v === true) el.setAttribute(k, '');
    else el.setAttribute(k, String(v));
  }
  // An action keeps focus across refreshes (see refill).
  if (el.dataset.action && !el.dataset.key) el.dataset.key = `action-${el.dataset.action}`;
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

/**
 * Replaces a container's children when they changed; the element that
 * had focus inside it (found again by its data-key) keeps it, so a refresh
 * every two seconds does not throw a keyboard user out.
 */
export function refill(container, ...children) {
  const next = document.createElement(container.tagName);
  append(next, children);
  // Unchanged content stays as it is: no flicker, open details stay open.
  if (next.innerHTML === container.innerHTML) return;
  const active = document.activeElement;
  const key = active && container.contains(active) ? active.dataset.key : undefined;
  container.replaceChildren(...next.childNodes);
  if (key) container.querySelector(`[data-key="${CSS.escape(key)}"]`)?.focus();
}

export const ROLES = ['viewer', 'operator', 'admin'];

/** Whether the signed-in role is at least `role`. */
export function can(session, role) {
  return ROLES.indexOf(session.role) >= ROLES.indexOf(role);
}

export function fmtTime(ms) {
  if (!ms) return '—';
  const d = new Date(ms);
  const p = (n) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}

export function fmtClock(ms) {
  const d = new Date(ms);
  const p = (n) => String(n).padStart(2, '0');
  return `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}

export function fmtDuration(ms) {
  if (ms === null || ms === undefined) return '—';
  const s = ms / 1000;
  if (s < 1) return `${Math.round(ms)} ms`;
  if (s < 10) return `${s.toFixed(1)} s`;
  if (s < 120) return `${Math.round(s)} s`;
  if (s < 7200) return `${Math.round(s / 60)} min`;
  if (s < 172800) return `${(s / 3600).toFixed(1)} h`;
  return `${(s / 86400).toFixed(1)} d`;
}

export function fmtAgo(ms) {
  return ms ? `${fmtDuration(Math.max(0, Date.now() - ms))} ago` : 'never';
}

export function fmtBytes(n) {
  if (n === null || n === undefined) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

export function fmtRate(bytesPerSec) {
  return bytesPerSec === null || bytesPerSec === undefined ? '—' : `${fmtBytes(Math.round(bytesPerSec))}/s`;
}

/** A VPG status as a coloured pill. */
export function statusPill(status) {
  const tone = {
    Protecting: 'ok',
    Initializing: 'info',
    Test: 'info',
    Failover: 'warn',
    Promoting: 'warn',
    NeedReverseConfiguration: 'warn',
    PromotingAndNeedReverseConfiguration: 'warn',
    PromotionCompleteMirrorsNotYetActivated: 'warn',
    MissingConfiguration: 'bad',
    PromotingAndMissingConfiguration: 'bad',
    RemoveInProgress: 'warn',
    Error: 'bad',
  }[status];
  return h('span', { class: `pill ${tone || ''}`, dataset: { status } }, words(status));
}

/** "NeedReverseConfiguration" as "Need reverse configuration". */
export function words(camel) {
  const s = String(camel).replace(/_/g, ' ').replace(/([a-z])([A-Z])/g, '$1 $2').toLowerCase();
  return s.charAt(0).toUpperCase() + s.slice(1);
}

export function pill(text, tone) {
  return h('span', { class: `pill ${tone || ''}` }, text);
}

/** A bar filled to `fraction` (0..1), with its tone. */
export function bar(fraction, tone, label) {
  const pct = Math.max(0, Math.min(1, fraction || 0)) * 100;
  return h('div', { class: `bar ${tone || ''}`, role: 'img', 'aria-label': label || `${Math.round(pct)} %` },
    h('span', { style: { width: `${pct}%` } }));
}

export function progress(pct) {
  return h('div', { class: 'progress' },
    h('div', { class: 'bar info', role: 'progressbar', 'aria-valuenow': pct, 'aria-valuemin': 0, 'aria-valuemax': 100 },
      h('span', { style: { width: `${pct}%` } })),
    h('span', { class: 'num muted' }, `${pct} %`));
}

export function toast(message, tone) {
  const el = h('div', { class: `toast ${tone || ''}`, role: tone === 'bad' ? 'alert' : 'status' }, message);
  const box = document.getElementById('toasts');
  box.append(el);
  // The newest three are enough; older ones would cover the page.
  while (box.children.length > 3) box.firstElementChild.remove();
  setTimeout(() => el.remove(), tone === 'bad' ? 9000 : 5000);
}

/** What went wrong, in the API's words when it gave some. */
export function explain(e) {
  if (e && e.body && typeof e.body === 'object' && e.body.message) return e.body.message;
  return e && e.message ? e.message : String(e);
}

/**
 * A modal dialog holding a form. `build(form)` fills it and returns the
 * element to focus first; `submit(form)` runs on submit and closes the
 * dialog unless it throws (its message is shown in the dialog).
 */
export function openDialog({ title, build, submit, submitLabel = 'OK', danger = false, id }) {
  const error = h('p', { class: 'error', role: 'alert', hidden: true });
  const body = h('div');
  const ok = h('button', { type: 'submit', class: danger ? 'danger' : 'primary', dataset: { role: 'submit' } }, submitLabel);
  const cancel = h('button', { type: 'button', value: 'cancel' }, 'Cancel');
  const form = h('form', { method: 'dialog', novalidate: true }, h('h2', {}, title), body, error,
    h('div', { class: 'buttons' }, cancel, ok));
  const dialog = h('dialog', { id, 'aria-label': title }, form);
  document.body.append(dialog);
  const first = build(body, { ok, dialog });
  cancel.addEventListener('click', () => dialog.close());
  dialog.addEventListener('close', () => dialog.remove());
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    if (!form.reportValidity()) return;
    ok.disabled = true;
    error.hidden = true;
    try {
      const keepOpen = await submit(body, { ok, dialog });
      if (!keepOpen) dialog.close();
    } catch (e) {
      error.textContent = explain(e);
      error.hidden = false;
    } finally {
      ok.disabled = false;
    }
  });
  dialog.showModal();
  (first || ok).focus();
  return dialog;
}

export function field(label, input, hint) {
  const id = input.id || `f-${Math.random().toString(36).slice(2)}`;
  input.id = id;
  return h('div', { class: 'field' }, h('label', { for: id }, label), input, hint ? h('span', { class: 'hint' }, hint) : null);
}

/** A table: head labels (a leading '#' right-aligns), then rows. */
export function table(head, rows, empty) {
  if (!rows.length) return h('p', { class: 'empty' }, empty || 'Nothing yet.');
  return h('table', {},
    h('thead', {}, h('tr', {}, head.map((t) => (t.startsWith('#') ? h('th', { class: 'num', scope: 'col' }, t.slice(1)) : h('th', { scope: 'col' }, t))))),
    h('tbody', {}, rows));
}

/** Page heading with optional actions. */
export function pageHead(title, subtitle, ...actions) {
  return h('div', { class: 'page-head' },
    h('div', { class: 'titles' }, h('h1', {}, title), subtitle ? h('div', { class: 'muted' }, subtitle) : null),
    h('div', { class: 'actions' }, actions));
}

export function alertRow(a) {
  return h('tr', { dataset: { alert: a.kind } },
    h('td', {}, pill(words(a.kind), 'bad')),
    h('td', {}, a.subject_name || a.subject),
    h('td', {}, a.message),
    h('td', { class: 'muted' }, fmtAgo(a.raised_ms)));
}
