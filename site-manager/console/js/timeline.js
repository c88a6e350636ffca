// The checkpoint timeline: a VPG's recovery points over a chosen window,
// told apart by kind (automatic, named, application-consistent,
// inconsistent), each a button that picks or unpicks it. Arrow keys move
// between points; Enter or Space picks.

import { h, refill, fmtClock, fmtTime, words } from './ui.js';

/** Labels and spans; 'Fit' spans the points (at most an hour), 'All' every point fetched. */
export const WINDOWS = [
  ['Fit', -1],
  ['2 min', 120e3],
  ['10 min', 600e3],
  ['1 h', 3600e3],
  ['24 h', 86400e3],
  ['All', 0],
];

/** Automatic points drawn at most; named, consistent-with-apps, inconsistent and picked ones always are. */
const MAX_AUTOMATIC = 160;

export function kindOf(c) {
  if (!c.consistent || c.kind === 'Inconsistent') return 'inconsistent';
  if (c.application_consistent || c.kind === 'ApplicationConsistent') return 'app';
  if (c.kind === 'Named') return 'named';
  return 'auto';
}

const KIND_WORDS = { auto: 'automatic', named: 'named', app: 'application-consistent', inconsistent: 'inconsistent' };

export function describe(c) {
  const parts = [`Checkpoint ${c.id}`, KIND_WORDS[kindOf(c)]];
  if (c.name) parts.push(`“${c.name}”`);
  parts.push(fmtTime(c.time_ms));
  if (!c.durable) parts.push('not yet durable');
  if (c.reason) parts.push(c.reason);
  return parts.join(', ');
}

/**
 * `picked` is a Map id -> checkpoint the page owns; `onChange` runs after
 * a pick. Returns {el, update(checkpoints, now)}.
 */
export function timeline({ picked, onChange, canPick }) {
  let windowMs = WINDOWS[0][1];
  let last = { checkpoints: [], now: Date.now() };
  const track = h('div', { class: 'timeline', role: 'group', 'aria-label': 'Checkpoint timeline' });
  const select = h('select', { id: 'timeline-window', 'aria-label': 'Timeline window' },
    WINDOWS.map(([label, ms]) => h('option', { value: ms, selected: ms === windowMs }, label)));
  select.addEventListener('change', () => {
    windowMs = Number(select.value);
    draw();
  });
  const count = h('span', { class: 'muted' });
  const legend = h('span', { class: 'legend' },
    Object.entries(KIND_WORDS).map(([k, w]) => h('span', {}, h('i', { class: k }), w)));
  const el = h('div', {},
    h('div', { class: 'timeline-tools' }, h('label', { for: 'timeline-window' }, 'Window'), select, count, legend),
    track);

  track.addEventListener('keydown', (ev) => {
    if (ev.key !== 'ArrowLeft' && ev.key !== 'ArrowRight' && ev.key !== 'Home' && ev.key !== 'End') return;
    const all = [...track.querySelectorAll('.cp')];
    const i = all.indexOf(document.activeElement);
    if (i < 0) return;
    ev.preventDefault();
    const j = { ArrowLeft: i - 1, ArrowRight: i + 1, Home: 0, End: all.length - 1 }[ev.key];
    all[Math.max(0, Math.min(all.length - 1, j))].focus();
  });

  function draw() {
    const { checkpoints, now } = last;
    const end = now;
    const oldest = checkpoints.length ? checkpoints[0].time_ms : end - 60e3;
    let start;
    if (windowMs > 0) start = end - windowMs;
    else if (windowMs === 0) start = Math.min(end - 60e3, oldest);
    else start = Math.max(end - 3600e3, oldest - Math.max(2000, (end - oldest) * 0.04));
    const shown = checkpoints.filter((c) => c.time_ms >= start);
    const autos = shown.filter((c) => kindOf(c) === 'auto' && !picked.has(c.id));
    const every = Math.max(1, Math.ceil(autos.length / MAX_AUTOMATIC));
    const keepAuto = new Set(autos.filter((_, i) => (autos.length - 1 - i) % every === 0).map((c) => c.id));
    const drawn = shown.filter((c) => kindOf(c) !== 'auto' || picked.has(c.id) || keepAuto.has(c.id));
    count.textContent = `${shown.length} point${shown.length === 1 ? '' : 's'} in the window${every > 1 ? `, every ${every}th automatic one drawn` : ''}`;
    // 1 % to 97 %: a point at either end stays whole and clickable.
    const x = (t) => `${1 + (96 * (t - start)) / Math.max(1, end - start)}%`;
    const ticks = [];
    for (let i = 0; i <= 4; i += 1) {
      const t = start + ((end - start) * i) / 4;
      ticks.push(h('span', { style: { left: x(t) } }, i === 4 ? 'now' : fmtClock(t)));
    }
    refill(track,
      drawn.map((c) => {
        const kind = kindOf(c);
        const recoverable = kind !== 'inconsistent' && c.durable;
        return h('button', {
          type: 'button',
          class: `cp ${kind}${c.durable ? '' : ' nondurable'}`,
          style: { left: x(c.time_ms) },
          title: describe(c),
          'aria-label': describe(c),
          'aria-pressed': picked.has(c.id) ? 'true' : 'false',
          'aria-disabled': canPick && recoverable ? null : 'true',
          dataset: { key: `cp-${c.id}`, cp: c.id, kind },
          onclick: () => {
            if (!canPick || !recoverable) return;
            if (picked.has(c.id)) picked.delete(c.id);
            else picked.set(c.id, c);
            draw();
            onChange();
          },
        });
      }),
      h('div', { class: 'axis', 'aria-hidden': 'true' }, ticks));
  }

  return {
    el,
    update(checkpoints, now) {
      last = { checkpoints, now };
      draw();
    },
  };
}

export function kindWords(c) {
  return words(KIND_WORDS[kindOf(c)]);
}
