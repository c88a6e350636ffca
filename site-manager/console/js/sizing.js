// The sizing analyzer: from what a VPG's taps observed (or rates typed
// in), the link bandwidth a target RPO needs and the journal a target
// history needs, with and without compression. Anyone may ask.

import * as api from './api.js';
import { h, refill, pageHead, field, fmtRate, fmtBytes, explain } from './ui.js';
import { parseSize } from './new-vpg.js';

export async function render() {
  const vpgs = await api.get('/api/v1/vpgs');
  const vpg = h('select', { name: 'vpg' }, h('option', { value: '' }, 'None: use the rates typed below'),
    vpgs.map((v) => h('option', { value: v.id }, v.settings.name)));
  const average = h('input', { name: 'average', placeholder: 'observed (e.g. 20M per second)' });
  const peak = h('input', { name: 'peak', placeholder: 'observed' });
  const ratio = h('input', { name: 'compression_ratio', type: 'number', min: 0.01, max: 1, step: 'any', placeholder: 'observed, else 0.5' });
  const rpo = h('input', { name: 'rpo_secs', type: 'number', min: 1, value: 10, required: true });
  const history = h('input', { name: 'history_hours', type: 'number', min: 0.01, step: 'any', value: 24, required: true });
  const answer = h('div', { 'aria-live': 'polite' });
  const form = h('form', { novalidate: true },
    h('div', { class: 'row' }, field('Observed VPG', vpg), field('Average write rate (bytes/s)', average), field('Peak write rate (bytes/s)', peak), field('Link bytes per written byte', ratio)),
    h('div', { class: 'row' }, field('Target RPO (s)', rpo), field('Target history (h)', history)),
    h('button', { type: 'submit', class: 'primary' }, 'Size it'));
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    if (!form.reportValidity()) return;
    const rate = (input) => {
      if (!input.value.trim()) return undefined;
      const n = parseSize(input.value.replace(/\s*(per second|\/s)$/i, ''));
      if (!Number.isFinite(n)) throw new Error(`${JSON.stringify(input.value)} is not a rate`);
      return n;
    };
    try {
      const body = {
        rpo_secs: Number(rpo.value),
        history_secs: Math.round(Number(history.value) * 3600),
      };
      if (vpg.value) body.vpg = vpg.value;
      const a = rate(average);
      const p = rate(peak);
      if (a !== undefined) body.average_bytes_per_sec = a;
      if (p !== undefined) body.peak_bytes_per_sec = p;
      if (ratio.value) body.compression_ratio = Number(ratio.value);
      const r = await api.post('/api/v1/sizing', body);
      refill(answer, h('dl', { class: 'kv', id: 'sizing-answer' },
        h('dt', {}, 'Write rate'), h('dd', {}, `${fmtRate(r.average_bytes_per_sec)} average, ${fmtRate(r.peak_bytes_per_sec)} peak`),
        h('dt', {}, 'Compression'), h('dd', {}, `${r.compression_ratio.toFixed(2)} link bytes per written byte`),
        h('dt', {}, 'Link for the RPO'), h('dd', {}, `${fmtRate(r.bandwidth_bytes_per_sec)} without compression, ${fmtRate(r.bandwidth_with_compression_bytes_per_sec)} with`),
        h('dt', {}, 'Journal for the history'), h('dd', {}, `${fmtBytes(r.journal_bytes)} without compression, ${fmtBytes(r.journal_with_compression_bytes)} with`),
        h('dt', {}, 'From'), h('dd', {}, r.sources.join('; '))));
    } catch (e) {
      refill(answer, h('p', { class: 'error', role: 'alert' }, explain(e)));
    }
  });
  return { el: h('div', {}, pageHead('Sizing', 'Bandwidth and journal for a target RPO and history'), h('section', { class: 'panel' }, form), h('section', { class: 'panel' }, h('h2', {}, 'Answer'), answer)) };
}
