// The console's shell: sign-in, the routes (one hash per page) and the
// refresh loop that keeps the shown page live (docs/console.md).

import * as api from './api.js';
import { h, toast, explain, words } from './ui.js';
import * as dashboard from './dashboard.js';
import * as vpgs from './vpgs.js';
import * as vpg from './vpg.js';
import * as newVpg from './new-vpg.js';
import * as hosts from './hosts.js';
import * as tasks from './tasks.js';
import * as health from './health.js';
import * as sizing from './sizing.js';

/** How often the shown page asks the API again. */
const REFRESH_MS = 2000;

const routes = [
  [/^\/$/, dashboard, 'dashboard'],
  [/^\/vpgs$/, vpgs, 'vpgs'],
  [/^\/vpgs\/new$/, newVpg, 'vpgs'],
  [/^\/vpgs\/([0-9a-f-]{36})$/, vpg, 'vpgs'],
  [/^\/hosts$/, hosts, 'hosts'],
  [/^\/tasks$/, tasks, 'tasks'],
  [/^\/health$/, health, 'health'],
  [/^\/health\/([0-9a-f-]{36})$/, health, 'health'],
  [/^\/sizing$/, sizing, 'sizing'],
];

const state = { session: null, site: null, page: null, timer: null, generation: 0 };

function $(id) {
  return document.getElementById(id);
}

function showLogin(message) {
  stopPage();
  state.session = null;
  $('shell').hidden = true;
  $('login').hidden = false;
  const err = $('login-error');
  err.hidden = !message;
  err.textContent = message || '';
  $('login-token').value = '';
  $('login-token').focus();
}

async function signIn(secret) {
  api.setToken(secret);
  state.session = await api.get('/api/v1/session');
  state.site = await api.get('/api/v1/site');
  $('login').hidden = true;
  $('shell').hidden = false;
  $('site-name').textContent = state.site.name;
  $('whoami').textContent = `${state.session.name} · ${words(state.session.role)}`;
  $('whoami').dataset.role = state.session.role;
  document.title = `${state.site.name} · Site manager`;
  await route();
}

function stopPage() {
  clearTimeout(state.timer);
  state.timer = null;
  state.generation += 1;
  state.page?.dispose?.();
  state.page = null;
}

/** Shows the page the hash names, and refreshes it while it is shown. */
async function route() {
  if (!state.session) return;
  stopPage();
  const generation = state.generation;
  const path = location.hash.replace(/^#/, '') || '/';
  const found = routes.map(([re, mod, nav]) => [path.match(re), mod, nav]).find(([m]) => m);
  for (const a of document.querySelectorAll('[data-nav]')) {
    a.toggleAttribute('aria-current', false);
    if (found && a.dataset.nav === found[2]) a.setAttribute('aria-current', 'page');
  }
  const main = $('main');
  if (!found) {
    main.replaceChildren(h('h1', {}, 'Not found'), h('p', {}, 'No page is at ', h('code', {}, path), '. ', h('a', { href: '#/' }, 'Back to the dashboard')));
    return;
  }
  const [match, mod] = found;
  const ctx = { session: state.session, site: state.site, params: match.slice(1), navigate: (to) => { location.hash = to; } };
  main.replaceChildren(h('p', { class: 'muted' }, 'Loading…'));
  let page;
  try {
    page = await mod.render(ctx);
  } catch (e) {
    main.replaceChildren(h('h1', {}, 'Cannot show this page'), h('p', { class: 'error' }, explain(e)));
    return;
  }
  if (generation !== state.generation) return page.dispose?.();
  state.page = page;
  main.replaceChildren(page.el);
  main.focus({ preventScroll: true });
  const tick = async () => {
    if (generation !== state.generation) return;
    try {
      await page.refresh?.();
      $('live').classList.remove('stale');
      $('live').textContent = 'live';
    } catch (e) {
      $('live').classList.add('stale');
      $('live').textContent = `not updating: ${explain(e)}`;
    }
    if (generation === state.generation) state.timer = setTimeout(tick, REFRESH_MS);
  };
  await tick();
}

function start() {
  api.whenUnauthorized((body) => {
    if (state.session) showLogin(`Signed out: ${body && body.message ? body.message : 'the token is no longer accepted'}`);
  });
  $('login-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const secret = $('login-token').value.trim();
    if (!secret) return;
    $('login-submit').disabled = true;
    try {
      await signIn(secret);
    } catch (e) {
      api.setToken(null);
      showLogin(e.status === 401 ? 'That token is unknown or revoked.' : explain(e));
    } finally {
      $('login-submit').disabled = false;
    }
  });
  $('logout').addEventListener('click', () => {
    api.setToken(null);
    location.hash = '#/';
    showLogin();
  });
  window.addEventListener('hashchange', () => route());
  window.addEventListener('unhandledrejection', (ev) => toast(explain(ev.reason), 'bad'));
  const saved = api.token();
  if (saved) signIn(saved).catch(() => showLogin());
  else showLogin();
}

start();
