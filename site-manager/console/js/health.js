// The health report per VPG per day: data changed as written and as sent,
// worst RPO and time over the threshold, consistent points, history
// available against the policy; as a table and as CSV.

import * as api from './api.js';
import { h, refill, table, pageHead, fmtBytes, fmtDuration, toast, explain } from './ui.js';

export async function render(ctx) {
  const vpgs = await api.get('/api/v1/vpgs');
  const chosen = ctx.params[0] || (vpgs[0] && vpgs[0].id);
  const select = h('select', { id: 'health-vpg', 'aria-label': 'Protection group' },
    vpgs.map((v) => h('option', { value: v.id, selected: v.id === chosen }, v.settings.name)));
  select.addEventListener('change', () => ctx.navigate(`#/health/${select.value}`));
  const csv = h('button', { type: 'button', onclick: download }, 'Download CSV');
  const report = h('div');
  const el = h('div', {},
    pageHead('Health reports', 'One row per UTC day', vpgs.length ? select : null, vpgs.length ? csv : null),
    h('section', { class: 'panel' }, report));

  async function download() {
    try {
      const text = await api.getText(`/api/v1/vpgs/${chosen}/health?format=csv`);
      const url = URL.createObjectURL(new Blob([text], { type: 'text/csv' }));
      const name = (vpgs.find((v) => v.id === chosen)?.settings.name || 'vpg').replace(/[^A-Za-z0-9_-]+/g, '_');
      const a = h('a', { href: url, download: `health-${name}.csv` });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 1000);
    } catch (e) {
      toast(`No CSV: ${explain(e)}`, 'bad');
    }
  }

  async function refresh() {
    if (!chosen) {
      refill(report, h('p', { class: 'empty' }, 'No protection group is defined yet.'));
      return;
    }
    const days = await api.get(`/api/v1/vpgs/${chosen}/health`);
    refill(report, table(['Day', '#Written', '#Sent', '#Worst RPO', '#Over threshold', '#Consistent points', '#History / policy', '#Sampled'],
      [...days].reverse().map((d) => h('tr', { dataset: { day: d.day } },
        h('td', {}, d.day),
        h('td', { class: 'num' }, fmtBytes(d.written_bytes)),
        h('td', { class: 'num' }, fmtBytes(d.link_bytes)),
        h('td', { class: 'num' }, fmtDuration(d.max_rpo_ms)),
        h('td', { class: 'num' }, fmtDuration(d.over_threshold_secs * 1000)),
        h('td', { class: 'num' }, d.consistent_points),
        h('td', { class: 'num' }, `${fmtDuration(d.history_available_secs * 1000)} / ${fmtDuration(d.history_policy_secs * 1000)}`),
        h('td', { class: 'num' }, fmtDuration(d.sampled_secs * 1000)))),
      'No day is sampled yet (every 10 s once the VPG protects).'));
  }
  return { el, refresh };
}
