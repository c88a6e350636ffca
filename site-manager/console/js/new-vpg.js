// A new protection group: its settings, then its VMs in boot order, each
// with its disks, the host it runs on and the host it recovers to. The
// API checks everything again and names the field at fault.

import * as api from './api.js';
import { h, pageHead, field, toast, explain, can } from './ui.js';

/** "8M", "1.5G", "8388608" as bytes (binary units); NaN if not a size. */
export function parseSize(text) {
  const m = String(text).trim().match(/^(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?$/i);
  if (!m) return NaN;
  const unit = { '': 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3, T: 1024 ** 4 }[m[2].toUpperCase()];
  return Math.round(Number(m[1]) * unit);
}

function hostSelect(name, hosts, label) {
  return h('select', { name, required: true, 'aria-label': label },
    h('option', { value: '' }, 'Choose a host'),
    hosts.map((x) => h('option', { value: x.id }, x.name)));
}

export async function render(ctx) {
  if (!can(ctx.session, 'operator')) {
    return { el: h('div', {}, pageHead('New protection group'), h('p', {}, 'Your role may not define protection groups.')) };
  }
  const [site, peer, hosts, peerHosts] = await Promise.all([
    api.get('/api/v1/site'),
    api.getOrNull('/api/v1/site/peer'),
    api.get('/api/v1/hosts'),
    api.get('/api/v1/site/peer/hosts').catch(() => []),
  ]);
  const protectedHosts = hosts.filter((x) => x.vdsa === 'installed' || x.vdsa === 'down');
  const recoverySite = h('select', { name: 'recovery_site', id: 'vpg-recovery-site' },
    h('option', { value: site.id }, `This site (${site.name})`),
    peer ? h('option', { value: peer.site }, `The paired site (${peer.name})`) : null);
  const name = h('input', { name: 'name', id: 'vpg-name', required: true, maxlength: 128, placeholder: 'finance' });
  const interval = h('input', { name: 'checkpoint_interval_secs', type: 'number', min: 1, max: 3600, value: 5, required: true });
  const history = h('input', { name: 'journal_history_hours', type: 'number', min: 0.01, step: 'any', max: 720, value: 24, required: true });
  const rpo = h('input', { name: 'rpo_alert_secs', type: 'number', min: 1, value: 30, required: true });
  const testNet = h('input', { name: 'test_network', placeholder: 'isolated test network (optional)' });
  const failNet = h('input', { name: 'failover_network', placeholder: 'failover network (optional)' });
  const vmList = h('div', { id: 'vpg-vms' });
  const error = h('p', { class: 'error', role: 'alert', hidden: true });

  const recoveryHosts = () => (recoverySite.value === site.id ? protectedHosts : peerHosts);

  function addDisk(list) {
    const row = h('div', { class: 'row disk', dataset: { disk: list.children.length } },
      field('Disk name', h('input', { name: 'disk_name', required: true, placeholder: 'system' })),
      field('Device', h('input', { name: 'disk_device', required: true, placeholder: 'QEMU block node' }), 'The node the tap mirrors'),
      field('Size', h('input', { name: 'disk_size', required: true, placeholder: '20G' }), 'Bytes, or with K, M, G, T'));
    list.append(row);
  }

  function addVm() {
    const n = vmList.children.length + 1;
    const disks = h('div', { class: 'disks' });
    const recovery = hostSelect('recovery_host', recoveryHosts(), `VM ${n} recovery host`);
    const box = h('fieldset', { class: 'panel vm', dataset: { vm: n } },
      h('legend', {}, `VM ${n}`),
      h('div', { class: 'row' },
        field('VM name', h('input', { name: 'vm_name', required: true, placeholder: `vm-${n}` })),
        field('Runs on', hostSelect('host', protectedHosts, `VM ${n} host`)),
        field('Recovers to', recovery),
        field('Boot delay (s)', h('input', { name: 'boot_delay_secs', type: 'number', min: 0, value: 0 }))),
      field('Hypervisor reference', h('input', { name: 'hypervisor_ref', required: true, placeholder: '/run/vm-1/qmp.sock' }), 'KVM: the QMP socket of its QEMU on its host; vSphere: its managed object reference'),
      disks,
      h('button', { type: 'button', class: 'small', onclick: () => addDisk(disks) }, 'Add a disk'));
    addDisk(disks);
    vmList.append(box);
  }

  recoverySite.addEventListener('change', () => {
    for (const sel of vmList.querySelectorAll('select[name=recovery_host]')) {
      sel.replaceChildren(h('option', { value: '' }, 'Choose a host'), recoveryHosts().map((x) => h('option', { value: x.id }, x.name)));
    }
  });

  function settings() {
    const vms = [...vmList.querySelectorAll('fieldset.vm')].map((box) => {
      const v = (n) => box.querySelector(`[name=${n}]`).value.trim();
      return {
        id: crypto.randomUUID(),
        name: v('vm_name'),
        host: v('host'),
        hypervisor_ref: v('hypervisor_ref'),
        recovery_host: v('recovery_host'),
        boot_delay_secs: Number(v('boot_delay_secs') || 0),
        disks: [...box.querySelectorAll('.disk')].map((d) => {
          const w = (n) => d.querySelector(`[name=${n}]`).value.trim();
          const size = parseSize(w('disk_size'));
          if (!Number.isFinite(size) || size <= 0) throw new Error(`${v('vm_name') || 'a VM'}: the size ${JSON.stringify(w('disk_size'))} is not a size`);
          return { id: crypto.randomUUID(), name: w('disk_name'), device: w('disk_device'), size_bytes: size };
        }),
      };
    });
    return {
      name: name.value.trim(),
      recovery_site: recoverySite.value,
      vms,
      checkpoint_interval_ms: Math.round(Number(interval.value) * 1000),
      journal_history_secs: Math.round(Number(history.value) * 3600),
      rpo_alert_secs: Math.round(Number(rpo.value)),
      test_network: testNet.value.trim(),
      failover_network: failNet.value.trim(),
    };
  }

  const submit = h('button', { type: 'submit', class: 'primary', dataset: { action: 'create-vpg' } }, 'Create and start protecting');
  const form = h('form', { id: 'new-vpg-form', novalidate: true },
    h('section', { class: 'panel' }, h('h2', {}, 'Settings'),
      h('div', { class: 'row' }, field('Name', name), field('Recovers to', recoverySite)),
      h('div', { class: 'row' },
        field('Checkpoint every (s)', interval),
        field('Journal history (h)', history),
        field('RPO alert over (s)', rpo)),
      h('div', { class: 'row' }, field('Test network', testNet), field('Failover network', failNet))),
    h('section', { class: 'panel' }, h('h2', {}, 'VMs, in boot order'), vmList,
      h('button', { type: 'button', onclick: addVm }, 'Add a VM')),
    error,
    h('div', { class: 'actions' }, submit, h('a', { href: '#/vpgs' }, 'Cancel')));
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    error.hidden = true;
    if (!form.reportValidity()) return;
    submit.disabled = true;
    try {
      const r = await api.post('/api/v1/vpgs', settings());
      toast(`${r.vpg.settings.name} is created; its initial sync runs.`);
      ctx.navigate(`#/vpgs/${r.vpg.id}`);
    } catch (e) {
      error.textContent = explain(e);
      error.hidden = false;
    } finally {
      submit.disabled = false;
    }
  });
  addVm();
  return { el: h('div', {}, pageHead('New protection group', 'Its VMs are replicated together and recover to one checkpoint'), form) };
}
