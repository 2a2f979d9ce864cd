// `guard(action, options)(fn)`: ask the daemon before an async function's
// body runs, as the Python SDK's @permission_required does
// (kynara_sdk/decorator.py).
//
// The call's arguments are mapped into the request: the resource id,
// attributes and context are functions of the arguments, or, for a function
// taking one plain object, property names picked from it. The subject is the
// innermost `actingFor`. The body runs only on allow; everything else throws
// before it, so a guarded function fails closed: deny throws
// PermissionDenied, require_approval ApprovalRequired, and no answer at all
// (daemon down, a bad value, any error) throws that error.
//
// With `onApproval: 'wait'` a require_approval is waited on instead: the
// approval's state is streamed (waitApproval) for up to `approvalTimeoutMs`;
// once approved the same request is asked again with the grant and the body
// runs on that allow, once. A wait that ends without a grant throws
// ApprovalTimeout (the approval stays pending), ApprovalRejected or
// ApprovalExpired. `onWait(decision)` is awaited just before a wait starts,
// so the agent can pass the review URL to someone who can act on it. When
// the answer already cites an approved, unused grant of this request, there
// is nothing to wait for: no onWait, no wait, the retry with it at once.
//
// `failOpen: true` lets the body run, with no decision, when the daemon
// could not answer for a reason of availability (see FAIL_OPEN_CODES), and
// logs a warning naming the action and the code each time. It never
// overrides an answer: a deny, a require_approval, anything that goes wrong
// after one (a wait, the retry), a request the daemon refused as malformed,
// and every failure on the client's side (a value with no wire form, a
// closed client, a status that is not the daemon's) all still throw.

import { AsyncLocalStorage } from 'node:async_hooks';

import {
  Client,
  DEFAULT_APPROVAL_TIMEOUT_MS,
  checkMillis,
  checkOptions,
  resolveTarget,
} from './client.js';
import {
  AUDIT_UNAVAILABLE,
  ApprovalRequired,
  DAEMON_UNREACHABLE,
  KynaraError,
  POLICY_NOT_READY,
  PermissionDenied,
  SHUTTING_DOWN,
} from './errors.js';
import { describe } from './values.js';

/**
 * The codes `failOpen` lets a call through on: the daemon could not answer
 * now (unreachable, starting, its audit log failing, stopping), as the
 * Python SDK's guard. `daemon_unreachable` is the SDK's (no answer came at
 * all); the others count only when the daemon itself sent them
 * (`err.fromDaemon`): the same code from anywhere else is no word from the
 * daemon. A request it refused (invalid_request, identity_invalid,
 * request_too_large) is the caller's to fix, and stays closed; so does
 * `internal`: an input that makes the daemon fail must not open the door.
 */
export const FAIL_OPEN_CODES = Object.freeze([
  DAEMON_UNREACHABLE,
  POLICY_NOT_READY,
  AUDIT_UNAVAILABLE,
  SHUTTING_DOWN,
]);

const decisionStorage = new AsyncLocalStorage();
const clients = new Map();

/**
 * The allow that let the running guarded body start, or null (outside a
 * guarded body, or in one a failOpen let through without an answer).
 * Inside nested guarded calls it is the innermost one's.
 */
export function currentDecision() {
  return decisionStorage.getStore() ?? null;
}

/** The shared Client for `$KYNARA_TARGET` (else the default socket), made on first use. */
export function defaultClient() {
  const target = resolveTarget();
  let client = clients.get(target);
  if (client === undefined) {
    client = new Client({ target });
    clients.set(target, client);
  }
  return client;
}

/**
 * Close the shared clients; the next guarded call makes a fresh one. Calls
 * in flight on them reject with code `client_closed`.
 */
export function closeDefaultClients() {
  for (const client of clients.values()) {
    client.close();
  }
  clients.clear();
}

/**
 * Make a wrapper that runs an async function only when the daemon allows.
 *
 * @param {string} action dotted action name, e.g. `payments.refund.issue`
 * @param {object} options see GuardOptions in index.d.ts
 * @returns {(fn: Function) => Function} wraps `fn`; the wrapped function
 *   takes the same arguments and `this`, and always returns a promise
 * @throws {TypeError|RangeError} an option is malformed (at once, not on a call)
 */
export function guard(action, options = {}) {
  if (typeof action !== 'string' || !action) {
    throw new TypeError(`guard: action expected a dotted string, got ${typeof action}`);
  }
  const where = `guard(${action})`;
  const settings = guardSettings(options, where);
  const policy = failOpenPolicy(options, where);
  const mapping = {
    resourceId: idMapping(options.resourceId, `${where}: resourceId`),
    attributes: valuesMapping(options.attributes, `${where}: attributes`),
    context: valuesMapping(options.context, `${where}: context`),
  };

  return function wrap(fn) {
    if (typeof fn !== 'function') {
      throw new TypeError(`${where}: expected a function to wrap, got ${typeof fn}`);
    }
    const guarded = async function guarded(...args) {
      const client = settings.client ?? defaultClient();
      const request = {
        resourceKind: settings.resourceKind,
        resourceId: mapping.resourceId(args),
        attributes: mapping.attributes(args),
        context: mapping.context(args),
      };
      let decision;
      try {
        decision = await client.decide(action, request);
      } catch (err) {
        if (!policy.opensOn(err)) {
          throw err;
        }
        policy.warn(action, err);
        return decisionStorage.run(null, () => fn.apply(this, args));
      }
      if (settings.waits && waitable(decision)) {
        const approvalId = decision.approval.id;
        if (decision.approval.state !== 'approved') {
          if (settings.onWait !== undefined) {
            await settings.onWait(decision);
          }
          await client.waitApproval(approvalId, {
            timeoutMs: settings.approvalTimeoutMs,
            decisionId: decision.decisionId,
          });
        }
        // The same request (same subject, same values), now with the grant:
        // the daemon allows it once, or says why not.
        decision = await client.decide(action, { ...request, approvalId });
      }
      enforce(decision);
      return decisionStorage.run(decision, () => fn.apply(this, args));
    };
    Object.defineProperty(guarded, 'name', { value: fn.name || 'guarded' });
    return guarded;
  };
}

/** Throw unless `decision` is an allow. */
export function enforce(decision) {
  if (decision.decision === 'deny') {
    throw new PermissionDenied(decision);
  }
  if (decision.decision === 'require_approval') {
    // Asked not to wait, or asked again after a wait and pending once more
    // (the policies changed meanwhile, say).
    throw new ApprovalRequired(decision);
  }
}

function waitable(decision) {
  // Without an approval id there is nothing to wait on: throw instead.
  return decision.decision === 'require_approval' && Boolean(decision.approval?.id);
}

const GUARD_OPTIONS = [
  'resourceKind',
  'resourceId',
  'attributes',
  'context',
  'client',
  'onApproval',
  'approvalTimeoutMs',
  'onWait',
  'failOpen',
  'logger',
];

function guardSettings(options, where) {
  checkOptions(options, GUARD_OPTIONS, where);
  const { resourceKind, client, onWait } = options;
  if (typeof resourceKind !== 'string' || !resourceKind) {
    throw new TypeError(`${where}: resourceKind expected a dotted string, e.g. 'payments.refund'`);
  }
  if (client !== undefined && !(client instanceof Client)) {
    throw new TypeError(`${where}: client expected a Client, got ${describe(client)}`);
  }
  const onApproval = options.onApproval ?? 'throw';
  if (onApproval !== 'throw' && onApproval !== 'wait') {
    throw new TypeError(
      `${where}: onApproval expected 'throw' or 'wait', got ${String(onApproval)}`,
    );
  }
  const approvalTimeoutMs = options.approvalTimeoutMs ?? DEFAULT_APPROVAL_TIMEOUT_MS;
  checkMillis(approvalTimeoutMs, `${where}: approvalTimeoutMs`);
  if (onWait !== undefined) {
    if (typeof onWait !== 'function') {
      throw new TypeError(
        `${where}: onWait expected a function taking the Decision, got ${describe(onWait)}`,
      );
    }
    if (onApproval !== 'wait') {
      throw new TypeError(
        `${where}: onWait expected onApproval: 'wait' with it; without a wait it would never be called`,
      );
    }
  }
  return { resourceKind, client, waits: onApproval === 'wait', approvalTimeoutMs, onWait };
}

/**
 * What `failOpen` and `logger` make of a failure to get an answer: whether
 * it lets the call through, and the warning it logs when it does. Shared by
 * the guard and the middleware.
 */
export function failOpenPolicy(options, where) {
  const failOpen = options.failOpen ?? false;
  if (typeof failOpen !== 'boolean') {
    throw new TypeError(`${where}: failOpen expected true or false, got ${describe(failOpen)}`);
  }
  const logger = options.logger ?? console.warn;
  let log;
  if (typeof logger === 'function') {
    log = logger;
  } else if (logger !== null && typeof logger === 'object' && typeof logger.warn === 'function') {
    log = (message) => logger.warn(message);
  } else {
    throw new TypeError(
      `${where}: logger expected a function or an object with warn(), got ${describe(logger)}`,
    );
  }
  return {
    /** Log one line through the logger. */
    log,
    opensOn(err) {
      if (!failOpen || !(err instanceof KynaraError) || !FAIL_OPEN_CODES.includes(err.code)) {
        return false;
      }
      // No answer at all, or the daemon's own word that it cannot answer now.
      return err.code === DAEMON_UNREACHABLE || err.fromDaemon === true;
    },
    /** Log that a call to `action` went through without an answer, and why. */
    warn(action, err) {
      log(`kynara: failOpen let ${action} through without a decision (${err.code}): ${err.detail}`);
    },
  };
}

function idMapping(spec, where) {
  if (spec === undefined) {
    return () => '';
  }
  if (typeof spec === 'function') {
    return (args) => resourceId(spec(...args), where);
  }
  if (typeof spec === 'string' && spec) {
    return (args) => resourceId(soleObject(args, where)[spec], where);
  }
  throw new TypeError(
    `${where}: expected a function of the arguments or a property name, got ${describe(spec)}`,
  );
}

function valuesMapping(spec, where) {
  if (spec === undefined) {
    return () => undefined;
  }
  if (typeof spec === 'function') {
    return (args) => spec(...args);
  }
  if (Array.isArray(spec) && spec.every((name) => typeof name === 'string' && name)) {
    const names = [...spec];
    return (args) => {
      const source = soleObject(args, where);
      // A property the object lacks stays absent, so a policy's has() sees
      // it absent rather than an invented value.
      const picked = Object.create(null);
      for (const name of names) {
        if (Object.hasOwn(source, name) && source[name] !== undefined) {
          picked[name] = source[name];
        }
      }
      return picked;
    };
  }
  throw new TypeError(
    `${where}: expected a function of the arguments or an array of property names, got ${describe(spec)}`,
  );
}

function soleObject(args, where) {
  const [first] = args;
  if (args.length !== 1 || first === null || typeof first !== 'object' || Array.isArray(first)) {
    throw new TypeError(
      `${where}: property names need one plain object argument, got ${args.length} argument(s)` +
        (args.length === 1 ? ` (${describe(first)})` : ''),
    );
  }
  return first;
}

/** A resource id as the request carries it: a string, or an integer in decimal. */
export function resourceId(value, where) {
  if (value === undefined || value === null) {
    return '';
  }
  if (typeof value === 'string') {
    return value;
  }
  if ((typeof value === 'number' && Number.isSafeInteger(value)) || typeof value === 'bigint') {
    return String(value);
  }
  throw new TypeError(`${where}: expected a string or integer resource id, got ${describe(value)}`);
}
