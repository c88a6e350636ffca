// The console's only back end: the site manager's REST API (docs/api.md),
// called with the signed-in token. Nothing here decides what a role may
// do; the API refuses, and the console shows what it said.

const TOKEN_KEY = 'site-manager-token';

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(secret) {
  if (secret) sessionStorage.setItem(TOKEN_KEY, secret);
  else sessionStorage.removeItem(TOKEN_KEY);
}

/** A refusal or failure, with the API's error body when it sent one. */
export class ApiError extends Error {
  constructor(status, body) {
    const what = body && typeof body === 'object' ? body.message : body;
    super(what || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

let onUnauthorized = () => {};
export function whenUnauthorized(f) {
  onUnauthorized = f;
}

export async function call(method, path, body) {
  const headers = { Authorization: `Bearer ${token() || ''}` };
  const init = { method, headers, cache: 'no-store' };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, `the site manager does not answer (${e.message})`);
  }
  const text = await response.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = text;
    }
  }
  if (response.status === 401) onUnauthorized(data);
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

export const get = (path) => call('GET', path);
export const post = (path, body) => call('POST', path, body);
export const put = (path, body) => call('PUT', path, body);
export const del = (path) => call('DELETE', path);

/** GET that answers null for a 404 (an unpaired site has no peer). */
export async function getOrNull(path) {
  try {
    return await get(path);
  } catch (e) {
    if (e.status === 404) return null;
    throw e;
  }
}

/** Text (CSV) with the token, for a download. */
export async function getText(path) {
  const r = await fetch(path, { headers: { Authorization: `Bearer ${token() || ''}` }, cache: 'no-store' });
  if (!r.ok) throw new ApiError(r.status, await r.text());
  return r.text();
}
