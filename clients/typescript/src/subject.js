// Who a call acts for: `actingFor` and the per-call override, as the Python
// SDK's acting_for (kynara_sdk/subject.py).
//
// The subject lives in an AsyncLocalStorage, not a global, so every async
// flow started inside `actingFor(subject, fn)` (awaits, timers, promise
// chains) sees it, and two requests served at once never see each other's.
// Blocks nest; the innermost wins whole (it replaces the outer subject, it
// does not append to it), and the outer one is back once `fn` is done.

import { AsyncLocalStorage } from 'node:async_hooks';

import { checkString } from './values.js';

const storage = new AsyncLocalStorage();

const SUBJECT_KEYS = ['user', 'chain', 'token'];

/**
 * Run `fn` with every decision inside it acting for `subject`.
 *
 * @template T
 * @param {{user?: string, chain?: readonly string[], token?: string}} subject
 *   exactly one of `user` (a user id), `chain` (user first, then any
 *   intermediate agents) or `token` (a delegation token)
 * @param {() => T} fn called at once, with no arguments
 * @returns {T} what `fn` returns (a promise stays a promise)
 * @throws {TypeError} the subject names none, or more than one, of user,
 *   chain, token, or a value is malformed; `fn` is not a function
 */
export function actingFor(subject, fn) {
  const resolved = resolveSubject(subject, 'actingFor');
  if (resolved === null) {
    throw new TypeError('actingFor: expected one of user, chain or token, got none');
  }
  if (typeof fn !== 'function') {
    throw new TypeError(`actingFor: expected a function to run, got ${typeof fn}`);
  }
  return storage.run(resolved, fn);
}

/** The subject of the innermost `actingFor`, or null outside any. */
export function currentSubject() {
  return storage.getStore() ?? null;
}

/**
 * The frozen subject named by at most one of `user`, `chain`, `token` in
 * `options`, or null when none is given (undefined counts as not given).
 *
 * @param {object | null | undefined} options
 * @param {string} where the caller's name, for error messages
 * @returns {{chain: readonly string[], token: string} | null}
 * @throws {TypeError} more than one is given, or one is malformed
 */
export function resolveSubject(options, where) {
  if (options === null || typeof options !== 'object') {
    throw new TypeError(
      `${where}: expected an object with user, chain or token, got ${options === null ? 'null' : typeof options}`,
    );
  }
  const given = SUBJECT_KEYS.filter((key) => options[key] !== undefined);
  if (given.length > 1) {
    throw new TypeError(
      `${where}: expected at most one of user, chain, token, got ${given.join(', ')}`,
    );
  }
  if (options.user !== undefined) {
    return Object.freeze({
      chain: Object.freeze([principal(options.user, `${where}: user`)]),
      token: '',
    });
  }
  if (options.chain !== undefined) {
    const { chain } = options;
    if (!Array.isArray(chain)) {
      throw new TypeError(
        `${where}: chain expected an array of principal ids, the user first, got ${typeof chain}`,
      );
    }
    if (chain.length === 0) {
      throw new TypeError(`${where}: chain expected at least one principal, got []`);
    }
    return Object.freeze({
      chain: Object.freeze(
        chain.map((item, index) => principal(item, `${where}: chain[${index}]`)),
      ),
      token: '',
    });
  }
  if (options.token !== undefined) {
    if (typeof options.token !== 'string' || !options.token) {
      throw new TypeError(`${where}: token expected a non-empty delegation token string`);
    }
    checkString(options.token, `${where}: token`);
    return Object.freeze({ chain: Object.freeze([]), token: options.token });
  }
  return null;
}

function principal(value, where) {
  if (typeof value !== 'string' || !value) {
    throw new TypeError(
      `${where} expected a non-empty string, got ${value === '' ? "''" : typeof value}`,
    );
  }
  return checkString(value, where);
}
