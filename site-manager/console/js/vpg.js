// One protection group: its figures, VMs, checkpoint timeline, failover
// tests (start at picked points, stop with a verdict), the failover wizard
// (checkpoint, then commit or roll back) and move. Actions show only for
// a role that may take them.

import * as api from './api.js';
import { taskStatus } from './tasks.js';
import {
  h, refill, table, pageHead, statusPill, can, fmtTime, fmtDuration, fmtBytes, pill, words, toast,
  openDialog, field, progress, explain,
} from './ui.js';
import { timeline, describe, kindWords, kindOf } from './timeline.js';
import { rpoCell, historyCell } from './dashboard.js';

const TEST_TONE = { Starting: 'info', Running: 'ok', Stopping: 'warn', Stopped: '', Failed: 'bad' };

/** Checkpoints fetched per refresh (the newest; hours at the default interval). */
const CHECKPOINTS = 5000;

function testPill(t) {
  return h('span', { class: `pill ${TEST_TONE[t.state] || ''}`, dataset: { state: t.state } }, words(t.state));
}

function resultPill(t) {
  if (!t.result) return h('span', { class: 'muted' }, '—');
  return h('span', { class: `pill ${t.result === 'pass' ? 'ok' : 'bad'}`, dataset: { result: t.result } }, t.result === 'pass' ? 'Pass' : 'Fail');
}

export async function render(ctx) {
  const id = ctx.params[0];
  const operator = can(ctx.session, 'operator');
  const picked = new Map();
  let current = { vpg: null, checkpoints: [], tests: [] };

  const head = h('div');
  const summary = h('div', { class: 'grid three' });
  const vms = h('div');
  const pickedBox = h('div', { class: 'picked', 'aria-live': 'polite' });
  const testsBox = h('div');
  const failoverBox = h('section', { class: 'panel', 'aria-labelledby': 'failover-title', hidden: true });
  const tasksBox = h('div');
  const checkpointsBox = h('div');
  const startTests = operator
    ? h('button', { type: 'button', class: 'primary', dataset: { action: 'start-tests' }, disabled: true, onclick: () => startPickedTests() }, 'Test picked points')
    : null;
  const line = timeline({ picked, onChange: () => drawPicked(), canPick: operator });

  const el = h('div', {},
    head,
    summary,
    h('section', { class: 'panel', 'aria-labelledby': 'timeline-title' },
      h('h2', { id: 'timeline-title' }, 'Checkpoints'),
      line.el,
      h('div', { class: 'picked' }, pickedBox, startTests),
      h('details', {}, h('summary', {}, 'Newest checkpoints as a list'), checkpointsBox)),
    failoverBox,
    h('section', { class: 'panel', 'aria-labelledby': 'tests-title' }, h('h2', { id: 'tests-title' }, 'Failover tests'), testsBox),
    h('section', { class: 'panel', 'aria-labelledby': 'vms-title' }, h('h2', { id: 'vms-title' }, 'VMs'), vms),
    h('section', { class: 'panel', 'aria-labelledby': 'vpg-tasks-title' }, h('h2', { id: 'vpg-tasks-title' }, 'Recent tasks'), tasksBox));

  function drawPicked() {
    const ids = [...picked.keys()].sort((a, b) => a - b);
    refill(pickedBox,
      ids.length ? h('span', { class: 'muted' }, operator ? 'Picked:' : 'Points:') : h('span', { class: 'muted' }, operator ? 'Pick points on the timeline to test them side by side.' : ''),
      ids.map((cid) => h('span', { class: 'chip', dataset: { picked: cid } }, `#${cid} ${fmtTime(picked.get(cid).time_ms).slice(11)}`,
        h('button', { type: 'button', 'aria-label': `Unpick checkpoint ${cid}`, dataset: { key: `unpick-${cid}` }, onclick: () => { picked.delete(cid); line.update(current.checkpoints, Date.now()); drawPicked(); } }, '×'))));
    if (startTests) {
      startTests.hidden = !current.vpg || !['Protecting', 'Test'].includes(current.vpg.status);
      startTests.disabled = ids.length === 0;
      startTests.textContent = ids.length ? `Test ${ids.length} picked point${ids.length === 1 ? '' : 's'}` : 'Test picked points';
    }
  }

  async function startPickedTests() {
    const ids = [...picked.keys()].sort((a, b) => a - b);
    startTests.disabled = true;
    try {
      const r = await api.post(`/api/v1/vpgs/${id}/failover-tests`, { checkpoints: ids });
      toast(`Started ${r.tests.length} failover test${r.tests.length === 1 ? '' : 's'} at ${ids.map((c) => `#${c}`).join(', ')}.`);
      picked.clear();
      drawPicked();
      await refresh();
    } catch (e) {
      toast(`The tests did not start: ${explain(e)}`, 'bad');
      startTests.disabled = false;
    }
  }

  function insertCheckpoint() {
    let name;
    let app;
    openDialog({
      title: 'Insert a named checkpoint',
      id: 'insert-checkpoint-dialog',
      submitLabel: 'Insert',
      build: (body) => {
        name = h('input', { name: 'name', required: true, maxlength: 1024, placeholder: 'before patch' });
        app = h('input', { type: 'checkbox', name: 'application_consistent' });
        body.append(field('Name', name), h('label', { class: 'check' }, app, 'Application-consistent (quiesce the VMs that name a way)'));
        return name;
      },
      submit: async () => {
        const r = await api.post(`/api/v1/vpgs/${id}/checkpoints`, { name: name.value.trim(), application_consistent: app.checked });
        toast(`Checkpoint #${r.id} “${name.value.trim()}” is being inserted.`);
      },
    });
  }

  function stopTest(t) {
    let pass;
    let fail;
    let notes;
    openDialog({
      title: `Stop the test at checkpoint #${t.checkpoint}`,
      id: 'stop-test-dialog',
      submitLabel: 'Stop test',
      build: (body) => {
        pass = h('input', { type: 'radio', name: 'result', value: 'pass', required: true });
        fail = h('input', { type: 'radio', name: 'result', value: 'fail' });
        notes = h('textarea', { name: 'notes', placeholder: 'What was checked, what was found' });
        body.append(
          h('p', { class: 'muted' }, 'Its test VMs are stopped and everything they wrote is discarded; the record stays.'),
          h('fieldset', {}, h('legend', {}, 'Result'), h('label', { class: 'check' }, pass, 'Pass'), h('label', { class: 'check' }, fail, 'Fail')),
          field('Notes', notes));
        return pass;
      },
      submit: async () => {
        const result = pass.checked ? 'pass' : fail.checked ? 'fail' : null;
        if (!result) throw new Error('Choose pass or fail.');
        await api.post(`/api/v1/failover-tests/${t.id}/stop`, { result, notes: notes.value });
        toast(`The test at #${t.checkpoint} is stopping (${result}).`);
        await refresh();
      },
    });
  }

  function failoverWizard() {
    let step = 1;
    let choice;
    openDialog({
      title: 'Fail over',
      id: 'failover-dialog',
      submitLabel: 'Next',
      danger: false,
      build: (body) => {
        const recoverable = current.checkpoints.filter((c) => kindOf(c) !== 'inconsistent' && c.durable).slice(-40).reverse();
        const pickedFirst = [...picked.values()].sort((a, b) => b.id - a.id);
        choice = h('select', { name: 'checkpoint', id: 'failover-checkpoint' },
          h('option', { value: '' }, 'The newest point every recovery host holds'),
          pickedFirst.length ? h('optgroup', { label: 'Picked on the timeline' }, pickedFirst.map((c) => h('option', { value: c.id }, describe(c)))) : null,
          h('optgroup', { label: 'Newest points' }, recoverable.map((c) => h('option', { value: c.id }, describe(c)))));
        if (pickedFirst.length) choice.value = String(pickedFirst[0].id);
        body.append(
          h('div', { class: 'steps' }, h('span', { class: 'current', dataset: { step: 1 } }, '1 Checkpoint'), h('span', { dataset: { step: 2 } }, '2 Confirm'), h('span', {}, '3 Commit or roll back')),
          field('Recover to', choice, 'The recovered VMs start from this point; replication stops until you roll back.'));
        return choice;
      },
      submit: async (body, { ok }) => {
        if (step === 1) {
          step = 2;
          const cp = choice.value ? current.checkpoints.find((c) => String(c.id) === choice.value) : null;
          body.querySelector('[data-step="1"]').classList.remove('current');
          body.querySelector('[data-step="2"]').classList.add('current');
          choice.disabled = true;
          body.append(h('p', { id: 'failover-confirm' }, `Fail ${current.vpg.settings.name} over to ${cp ? describe(cp) : 'the newest point'}? `,
            'Its VMs recover at their recovery hosts. Afterwards, commit to keep them, or roll back to discard what they wrote and protect again.'));
          ok.textContent = 'Fail over';
          ok.className = 'danger';
          return true;
        }
        const r = await api.post(`/api/v1/vpgs/${id}/failover`, { checkpoint: choice.value ? Number(choice.value) : null });
        toast(`Failing over to checkpoint #${r.failover.checkpoint}.`);
        await refresh();
        return false;
      },
    });
  }

  function confirmAction({ title, text, label, path, done, danger }) {
    openDialog({
      title,
      submitLabel: label,
      danger,
      build: (body) => { body.append(h('p', {}, text)); },
      submit: async () => {
        await api.post(path, {});
        toast(done);
        await refresh();
      },
    });
  }

  function drawHead(v) {
    const actions = [];
    if (operator) {
      const replicating = ['Protecting', 'Test', 'Initializing'].includes(v.status);
      if (replicating) actions.push(h('button', { type: 'button', dataset: { action: 'insert-checkpoint' }, onclick: insertCheckpoint }, 'Insert checkpoint'));
      if (['Protecting', 'Test'].includes(v.status)) actions.push(h('button', { type: 'button', class: 'danger', dataset: { action: 'failover' }, onclick: failoverWizard }, 'Fail over…'));
      if (v.status === 'Protecting' && !v.moving) {
        actions.push(h('button', { type: 'button', dataset: { action: 'move' }, onclick: () => confirmAction({
          title: `Move ${v.settings.name}`,
          text: 'Its VMs are powered off, a last checkpoint takes every write, and they start at their recovery hosts on it, committed. Nothing is lost; the VMs are down while it runs.',
          label: 'Move', path: `/api/v1/vpgs/${id}/move`, done: 'The move has started.', danger: true,
        }) }, 'Move…'));
      }
    }
    refill(head, pageHead(v.settings.name, h('span', {}, statusPill(v.status), ' ', v.status_reason || ''), actions));
  }

  function drawFailover(v, tests) {
    const f = [...tests].reverse().find((t) => t.purpose === 'failover' && (t.state === 'Starting' || t.state === 'Running'));
    failoverBox.hidden = !f && !['Failover', 'Promoting', 'NeedReverseConfiguration', 'PromotingAndNeedReverseConfiguration'].includes(v.status);
    if (failoverBox.hidden) return;
    const actions = [];
    if (operator && v.status === 'Failover' && f) {
      actions.push(
        h('button', { type: 'button', class: 'primary', dataset: { action: 'commit' }, onclick: () => confirmAction({
          title: 'Commit the failover', label: 'Commit', path: `/api/v1/vpgs/${id}/failover/commit`,
          text: `The recovered VMs keep running on checkpoint #${f.checkpoint} and what they wrote; the journal is promoted into the replicas. This cannot be rolled back.`,
          done: 'Committing: the journal is being promoted.',
        }) }, 'Commit'),
        h('button', { type: 'button', dataset: { action: 'rollback' }, onclick: () => confirmAction({
          title: 'Roll the failover back', label: 'Roll back', danger: true, path: `/api/v1/vpgs/${id}/failover/rollback`,
          text: 'The recovered VMs stop, what they wrote is discarded, and the VPG protects again from its source.',
          done: 'Rolling back.',
        }) }, 'Roll back'));
    }
    refill(failoverBox,
      h('h2', { id: 'failover-title' }, 'Failover', h('div', { class: 'actions' }, actions)),
      f ? h('dl', { class: 'kv', dataset: { failover: f.id } },
        h('dt', {}, 'Checkpoint'), h('dd', {}, `#${f.checkpoint}`),
        h('dt', {}, 'State'), h('dd', {}, testPill(f)),
        h('dt', {}, 'Started'), h('dd', {}, fmtTime(f.started_ms)),
        h('dt', {}, 'Recovered disks'), h('dd', {}, f.exports.map((x) => h('div', { class: 'mono' }, x.uri))),
        h('dt', {}, 'Written since'), h('dd', {}, fmtBytes(f.written_bytes)),
        h('dt', {}, 'Committed'), h('dd', { dataset: { committed: f.committed_ms ? 'yes' : 'no' } }, f.committed_ms ? fmtTime(f.committed_ms) : 'not yet: commit or roll back'),
        h('dt', {}, 'Promoted'), h('dd', {}, f.promoted_ms ? `${fmtTime(f.promoted_ms)}: the replicas are the recovered disks` : (f.committed_ms ? 'the journal is being promoted' : '—'))) : h('p', {}, statusPill(v.status), ' ', v.status_reason));
  }

  function drawTests(tests) {
    const rows = tests.filter((t) => t.purpose !== 'failover').reverse().map((t) => h('tr', { dataset: { test: t.id, checkpoint: t.checkpoint } },
      h('td', {}, `#${t.checkpoint}`),
      h('td', {}, testPill(t)),
      h('td', {}, fmtTime(t.started_ms)),
      h('td', { class: 'num' }, t.ready_ms ? fmtDuration(t.ready_ms - t.started_ms) : '—'),
      h('td', {}, t.exports.length ? h('details', {}, h('summary', {}, `${t.exports.length} disk${t.exports.length === 1 ? '' : 's'}`), t.exports.map((x) => h('div', { class: 'mono' }, x.uri))) : (t.detail || '—')),
      h('td', {}, resultPill(t)),
      h('td', {}, t.notes || ''),
      h('td', {}, operator && (t.state === 'Running' || t.state === 'Starting')
        ? h('button', { type: 'button', class: 'small', dataset: { action: 'stop-test', key: `stop-${t.id}` }, onclick: () => stopTest(t) }, 'Stop…')
        : null)));
    refill(testsBox, table(['Checkpoint', 'State', 'Started', '#Ready in', 'Exports', 'Result', 'Notes', ''], rows, 'No failover test has run yet.'));
  }

  async function refresh() {
    const [v, stats, checkpoints, tests, tasks, hosts] = await Promise.all([
      api.get(`/api/v1/vpgs/${id}`),
      api.get(`/api/v1/vpgs/${id}/stats`).catch(() => null),
      api.get(`/api/v1/vpgs/${id}/checkpoints?limit=${CHECKPOINTS}`),
      api.get(`/api/v1/vpgs/${id}/failover-tests`),
      api.get('/api/v1/tasks'),
      api.get('/api/v1/hosts'),
    ]);
    current = { vpg: v, checkpoints, tests };
    document.title = `${v.settings.name} · Site manager`;
    drawHead(v);
    refill(summary,
      h('section', { class: 'panel', 'aria-label': 'RPO' }, h('h2', {}, 'RPO'), rpoCell(stats)),
      h('section', { class: 'panel', 'aria-label': 'Journal history' }, h('h2', {}, 'Journal history'), historyCell(stats),
        h('p', { class: 'muted' }, stats ? `${fmtBytes(stats.journal_bytes)} in the recovery journals` : '')),
      h('section', { class: 'panel', 'aria-label': 'Replication' }, h('h2', {}, 'Replication'),
        h('dl', { class: 'kv' },
          h('dt', {}, 'Written'), h('dd', {}, stats ? fmtBytes(stats.written_bytes) : '—'),
          h('dt', {}, 'Sent'), h('dd', {}, stats ? fmtBytes(stats.link_bytes) : '—'),
          h('dt', {}, 'Writes'), h('dd', {}, stats ? stats.write_count.toLocaleString('en') : '—'),
          h('dt', {}, 'Deduplicated'), h('dd', {}, stats && stats.blocks_offered ? `${Math.round(100 * (1 - stats.blocks_sent / stats.blocks_offered))} % of blocks` : '—'),
          h('dt', {}, 'Checkpoints'), h('dd', {}, `every ${v.settings.checkpoint_interval_ms / 1000} s`))));
    const hostName = (hid) => hosts.find((x) => x.id === hid)?.name || hid;
    refill(vms, table(['VM', 'Runs on', 'Disks', 'Recovers to', '#Boot delay'], v.settings.vms.map((vm) => h('tr', {},
      h('td', {}, vm.name),
      h('td', {}, hostName(vm.host)),
      h('td', {}, vm.disks.map((d) => `${d.name} (${fmtBytes(d.size_bytes)})`).join(', ')),
      h('td', {}, hostName(vm.recovery_host)),
      h('td', { class: 'num' }, `${vm.boot_delay_secs || 0} s`))), 'No VM.'));
    for (const cid of [...picked.keys()]) if (!checkpoints.some((c) => c.id === cid)) picked.delete(cid);
    line.update(checkpoints, Date.now());
    drawPicked();
    refill(checkpointsBox, table(['#', 'Kind', 'Name', 'Time', 'Durable', '#Barrier hold'], checkpoints.slice(-20).reverse().map((c) => h('tr', {},
      h('td', {}, c.id),
      h('td', {}, pill(kindWords(c), kindOf(c) === 'inconsistent' ? 'bad' : kindOf(c) === 'app' ? 'ok' : kindOf(c) === 'named' ? 'info' : '')),
      h('td', {}, c.name || ''),
      h('td', {}, fmtTime(c.time_ms)),
      h('td', {}, c.durable ? 'yes' : 'not yet'),
      h('td', { class: 'num' }, `${(c.hold_us / 1000).toFixed(1)} ms`))), 'No checkpoint yet.'));
    drawFailover(v, tests);
    drawTests(tests);
    refill(tasksBox, table(['Task', 'Status', 'Progress', 'Started'], tasks.filter((t) => t.vpg === id).slice(0, 8).map((t) => h('tr', {},
      h('td', {}, t.description || t.kind),
      h('td', {}, taskStatus(t)),
      h('td', {}, progress(t.progress)),
      h('td', { class: 'muted' }, fmtTime(t.started_ms)))), 'No task yet.'));
  }

  return { el, refresh };
}
