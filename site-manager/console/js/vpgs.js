// The protection groups: those defined here, and the copies of the paired
// site's that recover to this site.

import * as api from './api.js';
import { h, refill, table, pageHead, statusPill, can, fmtTime } from './ui.js';

export async function render(ctx) {
  const own = h('div');
  const copies = h('div');
  const create = can(ctx.session, 'operator')
    ? h('button', { type: 'button', class: 'primary', dataset: { action: 'new-vpg' }, onclick: () => ctx.navigate('#/vpgs/new') }, 'New protection group')
    : null;
  const el = h('div', {},
    pageHead('Protection groups', 'VMs protected together: one write order, one checkpoint line', create),
    h('section', { class: 'panel' }, h('h2', {}, 'Defined at this site'), own),
    h('section', { class: 'panel' }, h('h2', {}, 'Recovering to this site from the paired site'), copies));

  async function refresh() {
    const [vpgs, peerVpgs] = await Promise.all([api.get('/api/v1/vpgs'), api.getOrNull('/api/v1/site/peer/vpgs').catch(() => [])]);
    const row = (v, link) => h('tr', { dataset: { vpg: v.id } },
      h('td', {}, link ? h('a', { href: `#/vpgs/${v.id}` }, v.settings.name) : v.settings.name),
      h('td', {}, statusPill(v.status)),
      h('td', { class: 'num' }, v.settings.vms.length),
      h('td', { class: 'num' }, v.settings.vms.reduce((n, vm) => n + vm.disks.length, 0)),
      h('td', { class: 'num' }, `${v.settings.checkpoint_interval_ms / 1000} s`),
      h('td', {}, v.status_reason || ''),
      h('td', { class: 'muted' }, fmtTime(v.created_ms)));
    const head = ['Name', 'Status', '#VMs', '#Disks', '#Checkpoints every', 'Reason', 'Created'];
    refill(own, table(head, vpgs.map((v) => row(v, true)), 'No protection group is defined here yet.'));
    refill(copies, table(head, (peerVpgs || []).map((v) => row(v, false)), 'None.'));
  }
  return { el, refresh };
}
