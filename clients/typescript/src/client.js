// The gRPC client: DecisionService over @grpc/grpc-js, with the protos loaded
// at run time by @grpc/proto-loader (no generated code to keep in step).

import { existsSync, readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';

import {
  APPROVAL_USED,
  ApprovalError,
  ApprovalExpired,
  ApprovalRejected,
  ApprovalRequired,
  ApprovalTimeout,
  CLIENT_CLOSED,
  INTERNAL,
  KynaraError,
  KynaraUnavailable,
  PermissionDenied,
  REQUEST_TOO_LARGE,
  UNEXPECTED_STATUS,
} from './errors.js';
import { currentSubject, resolveSubject } from './subject.js';
import { checkString, describe, toValueMap } from './values.js';

/** The environment variable naming the daemon to dial. */
export const TARGET_ENV = 'KYNARA_TARGET';
/** A file holding this agent's bearer secret, for a daemon serving several agents. */
export const SECRET_FILE_ENV = 'KYNARA_AGENT_SECRET_FILE';
/** Where a Kynara sidecar serves its agent by convention (/run/kynara volume). */
export const DEFAULT_TARGET = 'unix:///run/kynara/agent.sock';
/**
 * Milliseconds per call. A durable decision waits for one synced commit
 * (well under a millisecond); five seconds only trips on a stuck daemon, and
 * a tripped deadline fails closed.
 */
export const DEFAULT_TIMEOUT_MS = 5000;

/**
 * How long a wait on an approval lasts unless `timeoutMs` says otherwise:
 * long enough for a person to notice and decide, short enough that an agent
 * is not parked for hours holding its caller.
 */
export const DEFAULT_APPROVAL_TIMEOUT_MS = 300_000;

/**
 * The longest `timeoutMs` / `approvalTimeoutMs` taken: 2**31-1 ms (about
 * 24.8 days), the longest delay a Node timer holds. grpc-js arms its
 * deadline with one, and a longer deadline fails inside grpc-js rather than
 * at the caller's option.
 */
export const MAX_TIMEOUT_MS = 2 ** 31 - 1;

const CLIENT_OPTIONS = [
  'target',
  'timeoutMs',
  'secretFile',
  'certFile',
  'keyFile',
  'caFile',
  'protoRoot',
];
const DECIDE_OPTIONS = [
  'resourceKind',
  'resourceId',
  'attributes',
  'context',
  'user',
  'chain',
  'token',
  'requestId',
  'approvalId',
];
const BATCH_ITEM_OPTIONS = ['action', ...DECIDE_OPTIONS];
const WAIT_OPTIONS = ['timeoutMs', 'decisionId'];

const DECISION_PROTO = 'kynara/v1/decision.proto';
// Where the protos are looked for when no `protoRoot` is given: the copy an
// installed package carries (made by `npm pack`'s prepack step), else the
// repository's own, for a checkout.
const PACKAGE_PROTO_ROOT = fileURLToPath(new URL('../protos/', import.meta.url));
const REPOSITORY_PROTO_ROOT = fileURLToPath(new URL('../../../protos/', import.meta.url));

// A wait ends on these; "pending" is the only state that keeps it going.
const WAIT_END_STATES = new Set(['approved', 'rejected', 'expired', 'used']);

const ERROR_CODE_KEY = 'kynara-error-code';
const ERROR_FIELD_KEY = 'kynara-error-field';

const UNREACHABLE = new Set([
  grpc.status.UNAVAILABLE,
  grpc.status.DEADLINE_EXCEEDED,
  grpc.status.CANCELLED,
]);

const DECISIONS = {
  DECISION_ALLOW: 'allow',
  DECISION_DENY: 'deny',
  DECISION_REQUIRE_APPROVAL: 'require_approval',
};

const services = new Map();

/**
 * The DecisionService client constructor for the protos under `protoRoot`,
 * loaded once per root.
 */
function decisionService(protoRoot) {
  let service = services.get(protoRoot);
  if (service === undefined) {
    const definition = protoLoader.loadSync(DECISION_PROTO, {
      includeDirs: [protoRoot],
      // Field names in camelCase; 64-bit integers as decimal strings, exact;
      // enums by name; unset messages stay null so "no approval" reads so.
      keepCase: false,
      longs: String,
      enums: String,
      defaults: true,
      oneofs: true,
    });
    service = grpc.loadPackageDefinition(definition).kynara.v1.DecisionService;
    services.set(protoRoot, service);
  }
  return service;
}

/**
 * The directory holding kynara/v1/decision.proto: `protoRoot` when given,
 * else the package's copy, else the repository's.
 */
export function resolveProtoRoot(protoRoot) {
  if (protoRoot !== undefined) {
    if (typeof protoRoot !== 'string' || !protoRoot) {
      throw new TypeError('protoRoot: expected a directory path string');
    }
    if (!existsSync(`${protoRoot}/${DECISION_PROTO}`)) {
      throw new Error(`protoRoot: ${protoRoot} holds no ${DECISION_PROTO}`);
    }
    return protoRoot;
  }
  for (const root of [PACKAGE_PROTO_ROOT, REPOSITORY_PROTO_ROOT]) {
    if (existsSync(`${root}${DECISION_PROTO}`)) {
      return root;
    }
  }
  throw new Error(
    `@kynara/sdk: no ${DECISION_PROTO} in the package (${PACKAGE_PROTO_ROOT}) or the` +
      ` repository (${REPOSITORY_PROTO_ROOT}); pass protoRoot`,
  );
}

/** The target to dial: `target`, else `$KYNARA_TARGET`, else DEFAULT_TARGET. */
export function resolveTarget(target) {
  if (target !== undefined && typeof target !== 'string') {
    throw new TypeError(
      `target: expected 'unix:///path' or 'host:port' as a string, got ${describe(target)}`,
    );
  }
  return target || process.env[TARGET_ENV] || DEFAULT_TARGET;
}

/**
 * Refuse an options object that is not one, or names an option `known`
 * lacks (a typo such as `failopen` would otherwise be ignored silently).
 *
 * @param {unknown} options
 * @param {readonly string[]} known the option names taken
 * @param {string} where the caller's name, for error messages
 * @throws {TypeError} naming the unknown options and the known ones
 */
export function checkOptions(options, known, where) {
  if (options === null || typeof options !== 'object' || Array.isArray(options)) {
    throw new TypeError(`${where}: options expected an object, got ${describe(options)}`);
  }
  const unknown = Object.keys(options).filter((key) => !known.includes(key));
  if (unknown.length > 0) {
    throw new TypeError(
      `${where}: unknown option${unknown.length > 1 ? 's' : ''} ${unknown.join(', ')};` +
        ` expected any of ${known.join(', ')}`,
    );
  }
}

function credential(secretFile) {
  if (secretFile !== undefined && typeof secretFile !== 'string') {
    throw new TypeError(`secretFile: expected a file path string, got ${describe(secretFile)}`);
  }
  const path = secretFile || process.env[SECRET_FILE_ENV];
  if (!path) {
    return null;
  }
  let secret;
  try {
    secret = readFileSync(path, 'utf8').trim();
  } catch (err) {
    throw new Error(`secretFile: cannot read ${path}: ${err.message}`);
  }
  if (!secret) {
    throw new Error(`secretFile: ${path} is empty`);
  }
  return `Bearer ${secret}`;
}

function readPem(option, path) {
  if (typeof path !== 'string' || !path) {
    throw new TypeError(`${option}: expected a file path string, got ${describe(path)}`);
  }
  let content;
  try {
    content = readFileSync(path);
  } catch (err) {
    throw new Error(`${option}: cannot read ${path}: ${err.message}`);
  }
  if (!content.includes('-----BEGIN ')) {
    throw new Error(`${option}: expected PEM in ${path}, got none`);
  }
  return content;
}

/**
 * The channel credentials: TLS presenting this agent's client certificate
 * when `certFile` and `keyFile` are given (the daemon's `agent.tls` port, the
 * other per-agent credential), else plaintext (a Unix socket or loopback).
 */
function channelCredentials(target, options) {
  const { certFile, keyFile, caFile } = options;
  if (certFile === undefined && keyFile === undefined && caFile === undefined) {
    return grpc.credentials.createInsecure();
  }
  if (certFile === undefined || keyFile === undefined) {
    const missing = certFile === undefined ? 'certFile' : 'keyFile';
    throw new TypeError(
      `${missing}: expected a path with certFile and keyFile together` +
        " (the daemon's TLS port requires a client certificate), got none",
    );
  }
  if (target.startsWith('unix:') || target.startsWith('unix-abstract:')) {
    throw new TypeError(
      `certFile: TLS is for the daemon's TCP port (host:port), got the socket target` +
        ` ${JSON.stringify(target)}; a Unix socket carries no TLS`,
    );
  }
  return grpc.credentials.createSsl(
    caFile === undefined ? null : readPem('caFile', caFile),
    readPem('keyFile', keyFile),
    readPem('certFile', certFile),
  );
}

/** Asks a Kynara daemon whether an agent may act, over gRPC. */
export class Client {
  /**
   * @param {object} [options]
   * @param {string} [options.target] `unix:///path` or `host:port`
   * @param {number} [options.timeoutMs] per call
   * @param {string} [options.secretFile] this agent's bearer secret
   * @param {string} [options.certFile] this agent's client certificate (PEM,
   *   leaf first) for the daemon's TLS port (`agent.tls`); with keyFile
   * @param {string} [options.keyFile] the certificate's unencrypted PEM key
   * @param {string} [options.caFile] the CA that signed the daemon's serving
   *   certificate (PEM); default the system's roots
   * @param {string} [options.protoRoot] the directory holding kynara/v1/*.proto;
   *   default the package's copy, else the repository's protos/
   */
  constructor(options = {}) {
    checkOptions(options, CLIENT_OPTIONS, 'Client');
    const timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    checkMillis(timeoutMs, 'timeoutMs');
    this.target = resolveTarget(options.target);
    this.timeoutMs = timeoutMs;
    this._metadata = new grpc.Metadata();
    const authorization = credential(options.secretFile);
    if (authorization !== null) {
      this._metadata.set('authorization', authorization);
    }
    const Service = decisionService(resolveProtoRoot(options.protoRoot));
    this._stub = new Service(this.target, channelCredentials(this.target, options));
    this._closed = false;
    // Calls and streams in flight, cancelled by close().
    this._calls = new Set();
  }

  /**
   * Ask whether the subject may do `action` on the resource.
   *
   * @returns {Promise<import('../index.js').Decision>} allow, deny or
   *   require_approval; deny and require_approval are answers, not errors
   * @throws {KynaraUnavailable} no answer (code daemon_unreachable)
   * @throws {KynaraError} the daemon gave no answer; `code` says why
   * @throws {TypeError|RangeError} a value or the subject is malformed
   *   (nothing was sent)
   */
  async decide(action, options = {}) {
    this._checkOpen();
    checkOptions(options, DECIDE_OPTIONS, 'decide');
    const request = buildRequest(action, options);
    return decisionFromProto(await this._unary('Decide', request));
  }

  /**
   * As `decide`, but only an allow returns: a deny throws PermissionDenied
   * and a require_approval ApprovalRequired, each with the decision id.
   */
  async enforce(action, options = {}) {
    const decision = await this.decide(action, options);
    if (decision.decision === 'deny') {
      throw new PermissionDenied(decision);
    }
    if (decision.decision === 'require_approval') {
      throw new ApprovalRequired(decision);
    }
    return decision;
  }

  /**
   * Ask about several requests in one call; each is answered on its own and
   * in order, so one bad item gets its own error and does not stop the rest.
   *
   * @param {Iterable<object>} items each `{action, ...decide's options}`
   * @returns {Promise<Array<import('../index.js').Decision | KynaraError>>}
   *   one entry per item: its Decision, or the KynaraError saying why that
   *   item got no answer
   * @throws {KynaraError} the batch as a whole got no answer
   * @throws {TypeError|RangeError} an item is malformed, named by its index
   *   (`items[2]: ...`); nothing was sent
   */
  async decideBatch(items) {
    this._checkOpen();
    if (
      items === null ||
      typeof items !== 'object' ||
      typeof items[Symbol.iterator] !== 'function'
    ) {
      throw new TypeError(
        `items: expected an array of {action, ...options}, got ${items === null ? 'null' : typeof items}`,
      );
    }
    const requests = [];
    for (const item of items) {
      const index = requests.length;
      if (item === null || typeof item !== 'object') {
        throw new TypeError(
          `items[${index}]: expected {action, ...options}, got ${item === null ? 'null' : typeof item}`,
        );
      }
      try {
        checkOptions(item, BATCH_ITEM_OPTIONS, 'item');
        requests.push(buildRequest(item.action, item));
      } catch (err) {
        if (err instanceof TypeError || err instanceof RangeError) {
          throw new err.constructor(`items[${index}]: ${err.message}`, { cause: err });
        }
        throw err;
      }
    }
    const response = await this._unary('DecideBatch', { items: requests });
    if (response.items.length !== requests.length) {
      throw new KynaraError(
        INTERNAL,
        `expected one answer per request (${requests.length}), got ${response.items.length}`,
        'items',
      );
    }
    return response.items.map(outcomeFromItem);
  }

  /**
   * Wait until a reviewer resolves one of this agent's approvals.
   *
   * Streams the approval's state from the daemon (WaitApproval): at once,
   * then each change. Ending the wait, by timeout or otherwise, never
   * changes the approval.
   *
   * @param {string} approvalId the approval (ApprovalRequired.approvalId)
   * @param {object} [options]
   * @param {number} [options.timeoutMs] how long to wait at most; default
   *   DEFAULT_APPROVAL_TIMEOUT_MS
   * @param {string} [options.decisionId] the require_approval decision,
   *   attached to the errors
   * @returns {Promise<import('../index.js').ApprovalUpdate>} the `approved`
   *   update: retry with `decide(..., {approvalId})` to use the grant
   * @throws {ApprovalTimeout} no reviewer resolved it in time; it stays
   *   pending (never a rejection)
   * @throws {ApprovalRejected|ApprovalExpired} it was rejected or expired
   * @throws {ApprovalError} code approval_used (another request used it), or
   *   the daemon's code when it refused the wait (`not_found`: no approval
   *   of this agent has that id)
   * @throws {KynaraUnavailable} no answer, or the daemon ended the wait
   *   before a final state (it is stopping)
   */
  async waitApproval(approvalId, options = {}) {
    this._checkOpen();
    checkOptions(options, WAIT_OPTIONS, 'waitApproval');
    const { timeoutMs = DEFAULT_APPROVAL_TIMEOUT_MS, decisionId = '' } = options;
    if (typeof approvalId !== 'string' || !approvalId) {
      throw new TypeError('approvalId: expected a non-empty approval id string');
    }
    checkString(approvalId, 'approvalId');
    checkMillis(timeoutMs, 'timeoutMs');
    checkString(decisionId, 'decisionId');
    const call = this._stub.WaitApproval({ approvalId }, this._metadata, {
      deadline: Date.now() + timeoutMs,
    });
    this._calls.add(call);
    const more = (update) => ({ decisionId, update });
    return new Promise((resolve, reject) => {
      let last = null;
      let settled = false;
      const settle = (fn, value) => {
        this._calls.delete(call);
        if (!settled) {
          settled = true;
          fn(value);
        }
      };
      call.on('data', (message) => {
        if (settled) {
          return;
        }
        last = approvalUpdateFromProto(message);
        if (!WAIT_END_STATES.has(last.state)) {
          return;
        }
        const error = approvalError(last, decisionId);
        if (error === null) {
          settle(resolve, last);
        } else {
          settle(reject, error);
        }
        // The wait is over; ending the stream never changes the approval.
        call.cancel();
      });
      call.on('error', (err) => {
        if (settled) {
          return;
        }
        const metadata = err.metadata instanceof grpc.Metadata ? err.metadata : null;
        const coded = (metadata?.get(ERROR_CODE_KEY) ?? []).length > 0;
        if (this._closed && err.code === grpc.status.CANCELLED && !coded) {
          settle(
            reject,
            new ApprovalError(
              CLIENT_CLOSED,
              approvalId,
              'the Client was closed during the wait; the approval is unchanged',
              more(last),
            ),
          );
          return;
        }
        if (err.code === grpc.status.DEADLINE_EXCEEDED && !coded && last === null) {
          // Not one update came: the daemon was never reached (a silent
          // socket, a stuck connection), so nothing says the approval is
          // pending.
          settle(
            reject,
            new KynaraUnavailable(
              `no answer from the Kynara daemon at ${this.target} within ${timeoutMs} ms` +
                ` (DEADLINE_EXCEEDED before the approval's first state); approval ${approvalId}`,
            ),
          );
          return;
        }
        if (err.code === grpc.status.DEADLINE_EXCEEDED && !coded) {
          settle(
            reject,
            new ApprovalTimeout(
              approvalId,
              `no reviewer resolved it within ${timeoutMs} ms; it stays pending and may still be approved`,
              more(last),
            ),
          );
          return;
        }
        const error = errorFromStatus(err, this.target);
        settle(
          reject,
          coded
            ? new ApprovalError(error.code, approvalId, error.detail, {
                ...more(last),
                field: error.field,
                fromDaemon: true,
              })
            : error,
        );
      });
      call.on('end', () => {
        settle(
          reject,
          new KynaraUnavailable(
            `the Kynara daemon at ${this.target} ended the wait on approval ${approvalId}` +
              ' before it was resolved; wait again',
          ),
        );
      });
    });
  }

  /**
   * Close the channel. Calls and waits in flight reject at once with code
   * `client_closed` (never `daemon_unreachable`: it is no word on the
   * daemon); calls after this reject with it too.
   */
  close() {
    this._closed = true;
    for (const call of this._calls) {
      call.cancel();
    }
    this._calls.clear();
    this._stub.close();
  }

  _checkOpen() {
    if (this._closed) {
      throw new KynaraError(CLIENT_CLOSED, `Client for ${this.target}: closed; make a new one`);
    }
  }

  /** One unary call, tracked so close() can cancel it. */
  _unary(method, request) {
    return new Promise((resolve, reject) => {
      let done = false;
      const call = this._stub[method](
        request,
        this._metadata,
        { deadline: Date.now() + this.timeoutMs },
        (err, answer) => {
          done = true;
          this._calls.delete(call);
          if (!err) {
            resolve(answer);
          } else if (this._closed && err.code === grpc.status.CANCELLED) {
            reject(
              new KynaraError(CLIENT_CLOSED, `Client for ${this.target}: closed during the call`),
            );
          } else {
            reject(errorFromStatus(err, this.target));
          }
        },
      );
      if (!done) {
        this._calls.add(call);
      }
    });
  }
}

function checkMillis(value, where) {
  if (!(typeof value === 'number' && value > 0 && Number.isFinite(value))) {
    throw new RangeError(`${where}: expected a positive number of milliseconds, got ${value}`);
  }
  if (value > MAX_TIMEOUT_MS) {
    throw new RangeError(
      `${where}: expected at most MAX_TIMEOUT_MS (${MAX_TIMEOUT_MS} ms, about 24.8 days),` +
        ` got ${value}`,
    );
  }
}

export { checkMillis };

/** An optional string option: '' when absent; anything else but a string is refused. */
function stringOption(value, where) {
  if (value === undefined) {
    return '';
  }
  if (typeof value !== 'string') {
    throw new TypeError(`${where}: expected a string, got ${describe(value)}`);
  }
  return checkString(value, where);
}

function buildRequest(action, options) {
  if (typeof action !== 'string') {
    throw new TypeError(`action: expected a dotted string, got ${describe(action)}`);
  }
  checkString(action, 'action');
  // The call's own subject wins; else the innermost actingFor's.
  const subject = resolveSubject(options, 'subject') ?? currentSubject();
  return {
    requestId: stringOption(options.requestId, 'requestId'),
    delegationToken: subject?.token ?? '',
    assertedChain: subject ? [...subject.chain] : [],
    action,
    resource: {
      kind: stringOption(options.resourceKind, 'resourceKind'),
      id: stringOption(options.resourceId, 'resourceId'),
      attributes: toValueMap(options.attributes, 'resource.attributes'),
    },
    context: toValueMap(options.context, 'context'),
    approvalId: stringOption(options.approvalId, 'approvalId'),
  };
}

/**
 * Map a failed call to a KynaraError with a stable code. The daemon's
 * `kynara-error-code` metadata wins (`fromDaemon` true); without it
 * UNAVAILABLE, DEADLINE_EXCEEDED or CANCELLED is daemon_unreachable (no
 * answer came), RESOURCE_EXHAUSTED (gRPC's own size limit)
 * request_too_large, and anything else unexpected_status: not the daemon's
 * answer (the target is some other gRPC server or socket, or the call failed
 * in the client), which failOpen never lets through.
 */
export function errorFromStatus(err, target) {
  const metadata = err.metadata instanceof grpc.Metadata ? err.metadata : null;
  const first = (key) => {
    const value = metadata?.get(key)[0];
    return value === undefined ? '' : String(value);
  };
  const code = first(ERROR_CODE_KEY);
  const field = first(ERROR_FIELD_KEY);
  const statusName = grpc.status[err.code] ?? 'UNKNOWN';
  const details = err.details ?? '';
  if (code) {
    return new KynaraError(code, details || `daemon answered ${statusName}`, field, {
      fromDaemon: true,
    });
  }
  if (UNREACHABLE.has(err.code)) {
    return new KynaraUnavailable(
      `no answer from the Kynara daemon at ${target} (${statusName}: ${details})`,
    );
  }
  if (err.code === grpc.status.RESOURCE_EXHAUSTED) {
    return new KynaraError(REQUEST_TOO_LARGE, details || statusName, field);
  }
  return new KynaraError(
    UNEXPECTED_STATUS,
    `gRPC ${statusName} without the Kynara daemon's error code, so not the daemon's answer` +
      ` (is ${target} its agent socket?): ${details}`,
    field,
  );
}

function timestampToDate(stamp) {
  if (!stamp) {
    return null;
  }
  return new Date(Number(stamp.seconds) * 1000 + Math.floor(stamp.nanos / 1_000_000));
}

/**
 * A wire Timestamp as the daemon writes one in RFC 3339 (UTC, `Z`, the
 * fraction's trailing zeros dropped, none when zero), nanoseconds kept:
 * `2026-12-05T12:00:00.925235Z`. '' when unset.
 */
export function timestampText(stamp) {
  if (!stamp) {
    return '';
  }
  const seconds = BigInt(stamp.seconds);
  const days = seconds / 86_400n - (seconds % 86_400n < 0n ? 1n : 0n);
  const date = new Date(Number(days) * 86_400_000);
  const inDay = Number(seconds - days * 86_400n);
  const pad = (n, width = 2) => String(n).padStart(width, '0');
  const year = date.getUTCFullYear();
  const fraction = stamp.nanos ? `.${pad(stamp.nanos, 9).replace(/0+$/, '')}` : '';
  return (
    `${year < 0 ? '-' : ''}${pad(Math.abs(year), 4)}-${pad(date.getUTCMonth() + 1)}-` +
    `${pad(date.getUTCDate())}T${pad(Math.floor(inDay / 3600))}:` +
    `${pad(Math.floor(inDay / 60) % 60)}:${pad(inDay % 60)}${fraction}Z`
  );
}

function effect(name) {
  return DECISIONS[name] ?? 'unspecified';
}

function decisionFromProto(response) {
  const decision = DECISIONS[response.decision];
  if (decision === undefined) {
    throw new KynaraError(
      INTERNAL,
      `the daemon's answer carries no decision (${response.decision}); decision ${response.decisionId}`,
    );
  }
  const approval = response.approval
    ? Object.freeze({
        id: response.approval.id,
        url: response.approval.url,
        expiresAt: timestampToDate(response.approval.expiresAt),
        expiresAtText: timestampText(response.approval.expiresAt),
        state: response.approval.state,
        reviewers: Object.freeze([...response.approval.reviewers]),
        riskScore: response.approval.riskScore,
      })
    : null;
  return Object.freeze({
    decision,
    allowed: decision === 'allow',
    decisionId: response.decisionId,
    reasonCode: response.reasonCode,
    reason: response.reason,
    matchedRules: Object.freeze(
      response.matchedRules.map((rule) =>
        Object.freeze({
          policy: rule.policy,
          rule: rule.rule,
          effect: effect(rule.effect),
          principal: rule.principal,
          shadow: rule.shadow,
        }),
      ),
    ),
    policyRevision: response.policyRevision,
    directoryRevision: response.directoryRevision,
    auditSequence: BigInt(response.auditSequence),
    recordHash: response.recordHash,
    approval,
    chain: Object.freeze([...response.chain]),
    conditionErrors: Object.freeze(
      response.conditionErrors.map((error) => Object.freeze({ ...error })),
    ),
    requestId: response.requestId,
  });
}

function outcomeFromItem(item) {
  if (item.outcome === 'decision') {
    try {
      return decisionFromProto(item.decision);
    } catch (err) {
      if (err instanceof KynaraError) {
        return err;
      }
      throw err;
    }
  }
  if (item.outcome === 'error') {
    return new KynaraError(item.error.code || INTERNAL, item.error.message, item.error.field, {
      fromDaemon: Boolean(item.error.code),
    });
  }
  return new KynaraError(INTERNAL, 'expected a decision or an error, got neither');
}

function approvalUpdateFromProto(message) {
  return Object.freeze({
    approvalId: message.approvalId,
    state: message.state,
    approvals: message.approvals,
    approvalsNeeded: message.approvalsNeeded,
    expiresAt: timestampToDate(message.expiresAt),
    expiresAtText: timestampText(message.expiresAt),
    reviewers: Object.freeze([...message.reviewers]),
    comment: message.comment,
  });
}

/** The error a wait that ended at `update` throws; null when approved. */
function approvalError(update, decisionId) {
  const { approvalId, state } = update;
  const more = { decisionId, update };
  switch (state) {
    case 'approved':
      return null;
    case 'rejected':
      return new ApprovalRejected(
        approvalId,
        `rejected by a reviewer${update.comment ? `: ${update.comment}` : ''}`,
        more,
      );
    case 'expired':
      return new ApprovalExpired(approvalId, 'expired before it was approved', more);
    case 'used':
      return new ApprovalError(
        APPROVAL_USED,
        approvalId,
        'used already by another request; a grant allows one request once',
        more,
      );
    default:
      return new KynaraError(
        INTERNAL,
        `approval ${approvalId}: expected a state, got '${state}'`,
        'state',
      );
  }
}
