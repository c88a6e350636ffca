// The dashboard: both sites and the link between them, every VPG with its
// RPO against its threshold, throughput and journal history against the
// policy, and the alerts that are active.

import * as api from './api.js';
import { h, refill, table, pageHead, statusPill, fmtDuration, fmtRate, fmtBytes, fmtAgo, bar, pill, alertRow } from './ui.js';

/** Write rates between two refreshes, per VPG: {at_ms, written, link}. */
function rates(prev, now) {
  if (!prev || now.at_ms <= prev.at_ms || now.written_bytes < prev.written_bytes) return null;
  const secs = (now.at_ms - prev.at_ms) / 1000;
  return { write: (now.written_bytes - prev.written_bytes) / secs, link: (now.link_bytes - prev.link_bytes) / secs };
}

export function rpoCell(s) {
  if (!s || s.rpo_ms === null || s.rpo_ms === undefined) return h('span', { class: 'muted' }, 'no durable point yet');
  const over = s.rpo_ms > s.rpo_threshold_ms;
  const tone = over ? 'bad' : s.rpo_ms > s.rpo_threshold_ms / 2 ? 'warn' : '';
  return h('div', { class: 'barline', dataset: { rpoMs: s.rpo_ms } },
    bar(s.rpo_ms / s.rpo_threshold_ms, tone, `RPO ${fmtDuration(s.rpo_ms)} of ${fmtDuration(s.rpo_threshold_ms)}`),
    h('span', { class: over ? 'error' : '' }, `${fmtDuration(s.rpo_ms)} / ${fmtDuration(s.rpo_threshold_ms)}`));
}

export function historyCell(s) {
  if (!s) return '—';
  const short = s.history_available_secs < s.history_policy_secs;
  return h('div', { class: 'barline' },
    bar(s.history_available_secs / Math.max(1, s.history_policy_secs), short ? 'info' : '', 'journal history'),
    h('span', {}, `${fmtDuration(s.history_available_secs * 1000)} / ${fmtDuration(s.history_policy_secs * 1000)}`));
}

function siteCard(title, rows) {
  return h('section', { class: 'panel', 'aria-label': title }, h('h2', {}, title),
    h('dl', { class: 'kv' }, rows.map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)])));
}

export async function render(ctx) {
  const sites = h('div', { class: 'grid three' });
  const vpgBox = h('div');
  const alertBox = h('div');
  const el = h('div', {},
    pageHead('Dashboard', 'This site, its pair and every protection group'),
    sites,
    h('section', { class: 'panel', 'aria-labelledby': 'dash-vpgs' }, h('h2', { id: 'dash-vpgs' }, 'Protection groups'), vpgBox),
    h('section', { class: 'panel', 'aria-labelledby': 'dash-alerts' }, h('h2', { id: 'dash-alerts' }, 'Active alerts'), alertBox));
  const last = new Map();

  async function refresh() {
    const [site, peer, vpgs, alerts, hosts] = await Promise.all([
      api.get('/api/v1/site'),
      api.getOrNull('/api/v1/site/peer'),
      api.get('/api/v1/vpgs'),
      api.get('/api/v1/alerts'),
      api.get('/api/v1/hosts'),
    ]);
    const stats = await Promise.all(vpgs.map((v) => api.get(`/api/v1/vpgs/${v.id}/stats`).catch(() => null)));
    const up = hosts.filter((x) => x.vdsa === 'installed').length;
    let link;
    if (!peer) link = pill('Not paired', '');
    else if (!peer.last_error && peer.last_contact_ms && Date.now() - peer.last_contact_ms < 15000) link = pill('Up', 'ok');
    else link = pill('Down', 'bad');
    refill(sites,
      siteCard('This site', [
        ['Name', site.name],
        ['Location', site.location || '—'],
        ['API', site.address || location.host],
        ['VDSAs', `${up} of ${hosts.length} installed`],
      ]),
      siteCard('Paired site', peer ? [
        ['Name', peer.name],
        ['API', peer.address],
        ['Last contact', fmtAgo(peer.last_contact_ms)],
        ['Problem', peer.last_error || '—'],
      ] : [['Pairing', 'This site is not paired; VPGs recover to it.']]),
      h('section', { class: 'panel', 'aria-label': 'Site link' }, h('h2', {}, 'Site link'),
        h('div', { class: 'figure', dataset: { link: peer ? (link.textContent) : 'none' } }, link),
        h('p', { class: 'muted' }, peer ? `The exchange with ${peer.name} runs every second.` : 'Pair a second site to replicate across sites.')));
    const rows = vpgs.map((v, i) => {
      const s = stats[i];
      const r = s ? rates(last.get(v.id), s) : null;
      if (s) last.set(v.id, s);
      const side = v.settings.recovery_site === site.id ? 'this site' : (peer && peer.site === v.settings.recovery_site ? peer.name : 'another site');
      return h('tr', { dataset: { vpg: v.id } },
        h('td', {}, h('a', { href: `#/vpgs/${v.id}` }, v.settings.name)),
        h('td', {}, statusPill(v.status)),
        h('td', {}, side),
        h('td', {}, rpoCell(s)),
        h('td', { class: 'num' }, r ? fmtRate(r.write) : '—'),
        h('td', { class: 'num' }, r ? fmtRate(r.link) : '—'),
        h('td', {}, historyCell(s)),
        h('td', { class: 'num' }, s ? fmtBytes(s.journal_bytes) : '—'));
    });
    refill(vpgBox, table(['Name', 'Status', 'Recovers to', 'RPO / threshold', '#Writes', '#Link', 'Journal history / policy', '#Journal'], rows,
      'No protection group is defined yet.'));
    const active = alerts.filter((a) => !a.cleared_ms);
    refill(alertBox, table(['Alert', 'About', 'What', 'Since'], active.map(alertRow), 'No alert is active.'));
  }
  return { el, refresh };
}
