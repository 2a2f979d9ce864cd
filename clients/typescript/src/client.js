// The gRPC client: DecisionService over @grpc/grpc-js, with the protos loaded
// at run time by @grpc/proto-loader (no generated code to keep in step).

import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';

import {
  ApprovalRequired,
  INTERNAL,
  KynaraError,
  KynaraUnavailable,
  PermissionDenied,
  REQUEST_TOO_LARGE,
} from './errors.js';
import { toValueMap } from './values.js';

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

// The repository's protos. TODO(#10): ship a copy of protos/ inside the
// package (a prepack step) so that an installed @kynara/sdk finds them too;
// until then the `protoRoot` option names another directory.
const DEFAULT_PROTO_ROOT = fileURLToPath(new URL('../../../protos/', import.meta.url));
const DECISION_PROTO = 'kynara/v1/decision.proto';

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

/** The target to dial: `target`, else `$KYNARA_TARGET`, else DEFAULT_TARGET. */
export function resolveTarget(target) {
  return target || process.env[TARGET_ENV] || DEFAULT_TARGET;
}

function credential(secretFile) {
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

/** Asks a Kynara daemon whether an agent may act, over gRPC. */
export class Client {
  /**
   * @param {object} [options]
   * @param {string} [options.target] `unix:///path` or `host:port`
   * @param {number} [options.timeoutMs] per call
   * @param {string} [options.secretFile] this agent's bearer secret
   * @param {string} [options.protoRoot] the directory holding kynara/v1/*.proto
   */
  constructor(options = {}) {
    const timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    if (!(typeof timeoutMs === 'number' && timeoutMs > 0 && Number.isFinite(timeoutMs))) {
      throw new RangeError(`timeoutMs: expected a positive number of milliseconds, got ${timeoutMs}`);
    }
    this.target = resolveTarget(options.target);
    this.timeoutMs = timeoutMs;
    this._metadata = new grpc.Metadata();
    const authorization = credential(options.secretFile);
    if (authorization !== null) {
      this._metadata.set('authorization', authorization);
    }
    const Service = decisionService(options.protoRoot ?? DEFAULT_PROTO_ROOT);
    // TODO(#11): client certificates as the other per-agent credential;
    // only local insecure channels (Unix socket, loopback) are dialled.
    this._stub = new Service(this.target, grpc.credentials.createInsecure());
    this._closed = false;
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
    if (this._closed) {
      throw new Error('Client: closed; make a new one');
    }
    const request = buildRequest(action, options);
    const response = await new Promise((resolve, reject) => {
      this._stub.Decide(
        request,
        this._metadata,
        { deadline: Date.now() + this.timeoutMs },
        (err, answer) => (err ? reject(errorFromStatus(err, this.target)) : resolve(answer)),
      );
    });
    return decisionFromProto(response);
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

  /** Close the channel; calls after this throw. */
  close() {
    this._closed = true;
    this._stub.close();
  }
}

function buildRequest(action, options) {
  if (typeof action !== 'string') {
    throw new TypeError(`action: expected a dotted string, got ${typeof action}`);
  }
  const subjects = ['user', 'chain', 'token'].filter((key) => options[key] !== undefined);
  if (subjects.length > 1) {
    throw new TypeError(`subject: expected at most one of user, chain, token, got ${subjects.join(', ')}`);
  }
  let chain = [];
  if (options.user !== undefined) {
    if (typeof options.user !== 'string' || !options.user) {
      throw new TypeError('user: expected a non-empty string');
    }
    chain = [options.user];
  } else if (options.chain !== undefined) {
    if (!Array.isArray(options.chain) || !options.chain.every((p) => typeof p === 'string' && p)) {
      throw new TypeError('chain: expected an array of non-empty strings, the user first');
    }
    chain = [...options.chain];
  }
  if (options.token !== undefined && typeof options.token !== 'string') {
    throw new TypeError('token: expected a delegation token string');
  }
  return {
    requestId: options.requestId ?? '',
    delegationToken: options.token ?? '',
    assertedChain: chain,
    action,
    resource: {
      kind: options.resourceKind ?? '',
      id: options.resourceId ?? '',
      attributes: toValueMap(options.attributes, 'resource.attributes'),
    },
    context: toValueMap(options.context, 'context'),
    approvalId: options.approvalId ?? '',
  };
}

/**
 * Map a failed call to a KynaraError with a stable code. The daemon's
 * `kynara-error-code` metadata wins; without it UNAVAILABLE,
 * DEADLINE_EXCEEDED or CANCELLED is daemon_unreachable, RESOURCE_EXHAUSTED
 * (gRPC's own size limit) request_too_large, anything else internal.
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
    return new KynaraError(code, details || `daemon answered ${statusName}`, field);
  }
  if (UNREACHABLE.has(err.code)) {
    return new KynaraUnavailable(
      `no answer from the Kynara daemon at ${target} (${statusName}: ${details})`,
    );
  }
  if (err.code === grpc.status.RESOURCE_EXHAUSTED) {
    return new KynaraError(REQUEST_TOO_LARGE, details || statusName, field);
  }
  return new KynaraError(INTERNAL, `${statusName}: ${details}`, field);
}

function timestampToDate(stamp) {
  if (!stamp) {
    return null;
  }
  return new Date(Number(stamp.seconds) * 1000 + Math.floor(stamp.nanos / 1_000_000));
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
