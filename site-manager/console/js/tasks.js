// The command tracker: every long operation with its live progress.

import * as api from './api.js';
import { h, refill, table, pageHead, pill, words, fmtTime, fmtDuration, progress } from './ui.js';

export function taskStatus(t) {
  const tone = t.completion === 'Success' ? 'ok' : t.completion === 'NotAvailable' ? 'info' : 'bad';
  return pill(words(t.completion === 'NotAvailable' ? t.status : t.completion), tone);
}

export async function render() {
  const running = h('div');
  const done = h('div');
  const el = h('div', {},
    pageHead('Tasks', 'Long operations: syncs, tests, failovers, deploys'),
    h('section', { class: 'panel', 'aria-labelledby': 'tasks-running' }, h('h2', { id: 'tasks-running' }, 'Running'), running),
    h('section', { class: 'panel', 'aria-labelledby': 'tasks-done' }, h('h2', { id: 'tasks-done' }, 'Finished'), done));

  async function refresh() {
    const [tasks, vpgs] = await Promise.all([api.get('/api/v1/tasks'), api.get('/api/v1/vpgs')]);
    const vpgName = new Map(vpgs.map((v) => [v.id, v.settings.name]));
    const row = (t) => h('tr', { dataset: { task: t.id, kind: t.kind } },
      h('td', {}, t.description || words(t.kind),
        // A clean-point search says where it stands and, at the end, its answer.
        t.kind === 'clean_point_search' && t.result && t.result.summary
          ? h('div', { class: 'muted', dataset: { role: 'clean-point' } }, t.result.summary) : null),
      h('td', {}, t.vpg ? h('a', { href: `#/vpgs/${t.vpg}` }, vpgName.get(t.vpg) || t.vpg) : '—'),
      h('td', {}, taskStatus(t)),
      h('td', {}, progress(t.progress)),
      h('td', {}, fmtTime(t.started_ms)),
      h('td', { class: 'num' }, fmtDuration((t.ended_ms || Date.now()) - t.started_ms)),
      h('td', { class: 'error' }, t.exception || ''));
    const head = ['Task', 'VPG', 'Status', 'Progress', 'Started', '#Took', 'Problem'];
    refill(running, table(head, tasks.filter((t) => !t.ended_ms).map(row), 'Nothing is running.'));
    refill(done, table(head, tasks.filter((t) => t.ended_ms).slice(0, 50).map(row), 'No task has finished yet.'));
  }
  return { el, refresh };
}
