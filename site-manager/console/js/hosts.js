// The hosts of this site and their VDSAs: state, heartbeat, version; an
// admin adds hosts, deploys a VDSA (the OVA on vSphere, a registration
// token on KVM), undeploys and removes them.

import * as api from './api.js';
import { taskStatus } from './tasks.js';
import { h, refill, table, pageHead, can, fmtAgo, pill, words, toast, openDialog, field } from './ui.js';

const VDSA_TONE = { installed: 'ok', installing: 'info', booting: 'info', registering: 'info', down: 'bad', failed: 'bad', uninstalling: 'warn', not_installed: '' };

export async function render(ctx) {
  const admin = can(ctx.session, 'admin');
  const list = h('div');
  const tasksBox = h('div');
  const el = h('div', {},
    pageHead('Hosts', 'Hypervisor hosts and the VDSA on each',
      admin ? h('button', { type: 'button', class: 'primary', dataset: { action: 'add-host' }, onclick: addHost }, 'Add host') : null),
    h('section', { class: 'panel' }, list),
    h('section', { class: 'panel' }, h('h2', {}, 'Deploys and registrations'), tasksBox));

  function addHost() {
    let name;
    let hv;
    openDialog({
      title: 'Add a host',
      submitLabel: 'Add',
      build: (body) => {
        name = h('input', { name: 'name', required: true, placeholder: 'esx-01.example' });
        hv = h('select', { name: 'hypervisor' }, h('option', { value: 'kvm' }, 'KVM'), h('option', { value: 'vsphere' }, 'vSphere (ESXi)'));
        body.append(field('Name', name, 'vSphere: the host\u2019s name in vCenter'), field('Hypervisor', hv));
        return name;
      },
      submit: async () => {
        await api.post('/api/v1/hosts', { name: name.value.trim(), hypervisor: hv.value });
        toast(`Host ${name.value.trim()} is added.`);
        await refresh();
      },
    });
  }

  function registrationToken(host) {
    openDialog({
      title: `Install the VDSA on ${host.name}`,
      submitLabel: 'Make a token',
      build: (body) => {
        body.append(h('p', {}, 'A one-time registration token for this host\u2019s VDSA: put it in the VDSA\u2019s config file (the Debian package\u2019s /etc/vdsa/vdsa.toml). The host shows installed once the VDSA registers.'));
      },
      submit: async (body, { ok }) => {
        const t = await api.post(`/api/v1/hosts/${host.id}/registration-token`, {});
        body.replaceChildren(
          h('p', {}, 'Shown once. It expires ', fmtAgo(t.expires_ms).replace(' ago', ''), '.'),
          field('Registration token', h('input', { readonly: true, value: t.token, class: 'mono' })),
          field('Site manager address', h('input', { readonly: true, value: t.management_address, class: 'mono' })));
        ok.hidden = true;
        return true;
      },
    });
  }

  function deploy(host) {
    const inputs = {};
    openDialog({
      title: `Deploy the VDSA to ${host.name}`,
      submitLabel: 'Deploy',
      build: (body) => {
        for (const [k, label, ph, req] of [
          ['datastore', 'Datastore', 'datastore1', true],
          ['network', 'Network', 'VM Network', true],
          ['ip', 'Appliance address', '10.0.0.21', true],
          ['netmask', 'Netmask', '255.255.255.0', true],
          ['gateway', 'Gateway', '10.0.0.1 (optional)', false],
          ['dns', 'DNS servers', '10.0.0.2, 10.0.0.3 (optional)', false],
        ]) {
          inputs[k] = h('input', { name: k, required: req, placeholder: ph });
          body.append(field(label, inputs[k]));
        }
        return inputs.datastore;
      },
      submit: async () => {
        const v = (k) => inputs[k].value.trim();
        await api.post(`/api/v1/hosts/${host.id}/deploy`, {
          datastore: v('datastore'),
          network: v('network'),
          ip: v('ip'),
          netmask: v('netmask'),
          gateway: v('gateway') || null,
          dns: v('dns') ? v('dns').split(/[\s,]+/).filter(Boolean) : [],
        });
        toast(`Deploying the VDSA to ${host.name}.`);
        await refresh();
      },
    });
  }

  function confirm(host, what) {
    const undeploy = what === 'undeploy';
    openDialog({
      title: undeploy ? `Undeploy the VDSA from ${host.name}` : `Remove ${host.name}`,
      submitLabel: undeploy ? 'Undeploy' : 'Remove',
      danger: true,
      build: (body) => {
        body.append(h('p', {}, undeploy ? 'Its VDSA is powered off and removed; VPGs that use the host stop protecting there.' : 'The host leaves this site. A host that a VPG uses is refused.'));
      },
      submit: async () => {
        if (undeploy) await api.post(`/api/v1/hosts/${host.id}/undeploy`, {});
        else await api.del(`/api/v1/hosts/${host.id}`);
        toast(undeploy ? `Undeploying from ${host.name}.` : `${host.name} is removed.`);
        await refresh();
      },
    });
  }

  function actions(x) {
    if (!admin) return null;
    const out = [];
    if (x.hypervisor === 'vsphere' && (x.vdsa === 'not_installed' || x.vdsa === 'failed')) out.push(h('button', { type: 'button', class: 'small', dataset: { action: 'deploy', key: `deploy-${x.id}` }, onclick: () => deploy(x) }, 'Deploy…'));
    if (x.hypervisor === 'kvm' && (x.vdsa === 'not_installed' || x.vdsa === 'installing')) out.push(h('button', { type: 'button', class: 'small', dataset: { action: 'registration-token', key: `token-${x.id}` }, onclick: () => registrationToken(x) }, 'Install…'));
    if (x.hypervisor === 'vsphere' && x.vdsa !== 'not_installed' && x.vdsa !== 'uninstalling') out.push(h('button', { type: 'button', class: 'small', dataset: { action: 'undeploy', key: `undeploy-${x.id}` }, onclick: () => confirm(x, 'undeploy') }, 'Undeploy…'));
    out.push(h('button', { type: 'button', class: 'small', dataset: { action: 'remove-host', key: `remove-${x.id}` }, onclick: () => confirm(x, 'remove') }, 'Remove…'));
    return h('div', { class: 'actions' }, out);
  }

  async function refresh() {
    const [hosts, tasks] = await Promise.all([api.get('/api/v1/hosts'), api.get('/api/v1/tasks')]);
    hosts.sort((a, b) => a.name.localeCompare(b.name));
    refill(list, table(['Host', 'Hypervisor', 'VDSA', 'Replication address', 'Last heartbeat', 'Version', '#Generation', ''],
      hosts.map((x) => h('tr', { dataset: { host: x.id, vdsa: x.vdsa } },
        h('td', {}, x.name),
        h('td', {}, x.hypervisor === 'kvm' ? 'KVM' : 'vSphere'),
        h('td', { title: x.vdsa_reason || '' }, pill(words(x.vdsa), VDSA_TONE[x.vdsa]), x.vdsa_reason ? h('div', { class: 'muted small' }, x.vdsa_reason) : null),
        h('td', { class: 'mono' }, x.replication_address || '—'),
        h('td', {}, fmtAgo(x.last_heartbeat_ms)),
        h('td', {}, x.software_version || '—'),
        h('td', { class: 'num' }, x.vdsa_generation),
        h('td', {}, actions(x)))),
      'No host is added yet.'));
    const names = new Map(hosts.map((x) => [x.id, x.name]));
    refill(tasksBox, table(['Host', 'Task', 'Status', 'Detail'],
      tasks.filter((t) => t.host).slice(0, 10).map((t) => h('tr', {},
        h('td', {}, names.get(t.host) || t.host),
        h('td', {}, t.description || t.kind),
        h('td', {}, taskStatus(t)),
        h('td', { class: 'muted' }, t.exception || `${t.progress} %`))),
      'No deploy has run.'));
  }
  return { el, refresh };
}
