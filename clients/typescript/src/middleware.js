// `kynaraMiddleware(options)`: an Express-style `(req, res, next)` that asks
// the daemon before a route's handler runs, and answers as every Kynara HTTP
// door does (DESIGN.md "HTTP doors answer alike"; the daemon's Envoy
// ext_authz door gives the same bodies and headers):
//
// - allow: `next()`, with the Decision at `res.locals.kynara` and the header
//   `kynara-decision-id` on the response;
// - deny and require_approval: 403 with the JSON body
//   `{decision, reason, reason_code, decision_id}` and, when the answer
//   concerns an approval, `approval: {id, url, expires_at}`; the headers
//   `kynara-decision`, `kynara-decision-id` and (an approval with a URL)
//   `kynara-approval-url`;
// - no decision: 400, 401, 413, 503 or 500 with
//   `{error: {code, message, field}}`, never a pass (unless `failOpen`).
//
// The subject is what the server itself established: `subject(req)` reads
// it from the app's own authentication (req.user, a verified session, a
// verified token). The middleware reads no subject from the request's
// headers: a caller could name anyone there. The approval header
// (`kynara-approval-id`) is the one thing a caller sends: the retry after a
// reviewer approved, which the daemon allows only for the very request that
// was approved.
//
// It uses only `res.statusCode`, `res.setHeader` and `res.end`, so it serves
// a plain `node:http` server as well as Express.

import { Client, checkOptions } from './client.js';
import {
  AUDIT_UNAVAILABLE,
  DAEMON_UNREACHABLE,
  IDENTITY_INVALID,
  INTERNAL,
  INVALID_REQUEST,
  KynaraError,
  POLICY_NOT_READY,
  REQUEST_TOO_LARGE,
  SHUTTING_DOWN,
} from './errors.js';
import { defaultClient, failOpenPolicy, resourceId } from './guard.js';
import { resolveSubject } from './subject.js';

/** The request header naming an approved approval: the retry after require_approval. */
export const APPROVAL_HEADER = 'kynara-approval-id';
/** Response headers the middleware sets. */
export const DECISION_HEADER = 'kynara-decision';
export const DECISION_ID_HEADER = 'kynara-decision-id';
export const APPROVAL_URL_HEADER = 'kynara-approval-url';

// An HTTP header name (RFC 9110 token), lower case as node:http keys them.
const HEADER_NAME = /^[!#$%&'*+\-.^_`|~0-9a-z]+$/;

const MIDDLEWARE_OPTIONS = [
  'action',
  'resourceKind',
  'resourceId',
  'attributes',
  'context',
  'subject',
  'client',
  'approvalHeader',
  'failOpen',
  'logger',
];

/** The HTTP status of a request that got an error instead of a decision; else 500. */
export const HTTP_STATUS_OF_ERROR = Object.freeze({
  [INVALID_REQUEST]: 400,
  [IDENTITY_INVALID]: 401,
  [REQUEST_TOO_LARGE]: 413,
  [POLICY_NOT_READY]: 503,
  [AUDIT_UNAVAILABLE]: 503,
  [SHUTTING_DOWN]: 503,
  [DAEMON_UNREACHABLE]: 503,
});

/**
 * Make the middleware for one route (or a group of routes).
 *
 * @param {object} options see MiddlewareOptions in index.d.ts
 * @returns {(req, res, next) => Promise<void>}
 * @throws {TypeError} an option is malformed (at once, not per request)
 */
export function kynaraMiddleware(options = {}) {
  const where = 'kynaraMiddleware';
  checkOptions(options, MIDDLEWARE_OPTIONS, where);
  const action = stringOrFunction(options.action, `${where}: action`);
  const resourceKind = stringOrFunction(options.resourceKind, `${where}: resourceKind`);
  const idOf = optionalFunction(options.resourceId, `${where}: resourceId`);
  const attributes = optionalFunction(options.attributes, `${where}: attributes`);
  const context = optionalFunction(options.context, `${where}: context`);
  if (typeof options.subject !== 'function') {
    throw new TypeError(
      `${where}: subject expected a function of req giving the subject the server established` +
        ` (e.g. req => ({ user: req.user.id })), got ${typeof options.subject}`,
    );
  }
  const subjectOf = options.subject;
  if (options.client !== undefined && !(options.client instanceof Client)) {
    throw new TypeError(`${where}: client expected a Client`);
  }
  const approvalHeader = options.approvalHeader ?? APPROVAL_HEADER;
  const headerOk = typeof approvalHeader === 'string' && HEADER_NAME.test(approvalHeader);
  if (approvalHeader !== false && !headerOk) {
    throw new TypeError(
      `${where}: approvalHeader expected a lower-case HTTP header name such as` +
        ` '${APPROVAL_HEADER}', or false for none, got ${JSON.stringify(String(approvalHeader))}`,
    );
  }
  const policy = failOpenPolicy(options, where);

  return async function kynara(req, res, next) {
    if (typeof next !== 'function') {
      throw new TypeError(`${where}: expected (req, res, next) with next a function`);
    }
    let named;
    let request;
    let subject;
    try {
      named = await action(req);
      if (typeof named !== 'string' || !named) {
        throw new TypeError(`action expected a dotted string, got ${typeof named}`);
      }
      subject = await subjectOf(req);
      if (subject !== null && subject !== undefined) {
        subject = resolveSubject(subject, 'subject');
      }
      const kind = await resourceKind(req);
      if (typeof kind !== 'string') {
        throw new TypeError(`resourceKind expected a dotted string, got ${describe(kind)}`);
      }
      request = {
        resourceKind: kind,
        resourceId: resourceId(await idOf(req), 'resourceId'),
        attributes: await attributes(req),
        context: await context(req),
      };
    } catch (err) {
      // The app's own mapping failed: its fault, never a pass. The detail
      // goes to the app's log, not to the caller.
      policy.log(
        `kynara: ${where} could not map ${req.method} ${req.url} to a decision: ${err?.message ?? err}`,
      );
      sendError(res, INTERNAL, 'the request could not be mapped to a decision', '');
      return;
    }
    if (subject === null || subject === undefined) {
      sendError(
        res,
        IDENTITY_INVALID,
        'no subject: the server established no user for this request',
        'subject',
      );
      return;
    }
    Object.assign(
      request,
      subject.token ? { token: subject.token } : { chain: [...subject.chain] },
    );
    if (approvalHeader !== false) {
      const value = req.headers?.[approvalHeader];
      if (Array.isArray(value) || (typeof value === 'string' && value.includes(','))) {
        sendError(
          res,
          INVALID_REQUEST,
          `expected the header ${approvalHeader} once`,
          approvalHeader,
        );
        return;
      }
      if (typeof value === 'string' && value.trim()) {
        request.approvalId = value.trim();
      }
    }

    let decision;
    try {
      decision = await (options.client ?? defaultClient()).decide(named, request);
    } catch (err) {
      if (policy.opensOn(err)) {
        policy.warn(named, err);
        locals(res).kynara = null;
        next();
        return;
      }
      sendFailure(res, err, (cause) =>
        policy.log(
          `kynara: ${where} got no decision for ${named} (${req.method} ${req.url}): ${cause}`,
        ),
      );
      return;
    }
    if (decision.decision === 'allow') {
      locals(res).kynara = decision;
      res.setHeader(DECISION_ID_HEADER, decision.decisionId);
      next();
      return;
    }
    sendRefusal(res, decision);
  };
}

/** The 403 body a deny or require_approval answers with, as ext_authz gives it. */
export function refusalBody(decision) {
  const body = {
    decision: decision.decision,
    reason: decision.reason,
    reason_code: decision.reasonCode,
    decision_id: decision.decisionId,
  };
  if (decision.approval !== null) {
    body.approval = {
      id: decision.approval.id,
      url: decision.approval.url,
      // The daemon's exact RFC 3339 text (nanoseconds kept), as ext_authz
      // gives it; a Date would cut it to milliseconds.
      expires_at:
        decision.approval.expiresAtText ?? decision.approval.expiresAt?.toISOString() ?? '',
    };
  }
  return body;
}

function sendRefusal(res, decision) {
  const headers = {
    [DECISION_HEADER]: decision.decision,
    [DECISION_ID_HEADER]: decision.decisionId,
  };
  if (decision.approval?.url) {
    headers[APPROVAL_URL_HEADER] = decision.approval.url;
  }
  sendJson(res, 403, refusalBody(decision), headers);
}

/**
 * Answer a request that got no decision. Every 500 (a fault: the daemon's
 * `internal`, a status not from the daemon, a closed client, any other
 * error) is logged through `log` with its cause; the body names the code
 * (or the error's class), never the client's target or a stack.
 */
function sendFailure(res, err, log) {
  if (err instanceof KynaraError) {
    const status = HTTP_STATUS_OF_ERROR[err.code] ?? 500;
    let message = err.detail;
    if (err.code === DAEMON_UNREACHABLE) {
      // The socket path of an unreachable daemon is no business of the caller's.
      message = 'no answer from the Kynara daemon';
    } else if (status === 500 && !err.fromDaemon) {
      message =
        `the decision could not be asked for (${err.code});` + " the cause is in the server's log";
    }
    if (status === 500) {
      log(err.message);
    }
    sendError(res, err.code, message, err.field);
    return;
  }
  if (err instanceof TypeError || err instanceof RangeError) {
    // A value with no wire form (nothing was sent); the message names its
    // key path first, e.g. `resource.attributes.amount: expected ...`.
    const field = /^([^\s:]+): /.exec(err.message)?.[1] ?? '';
    sendError(res, INVALID_REQUEST, err.message, field);
    return;
  }
  const name = typeof err?.name === 'string' && err.name ? err.name : typeof err;
  log(`${name}: ${err?.message ?? String(err)}`);
  sendError(
    res,
    INTERNAL,
    `the decision could not be asked for (${name} in the server); the cause is in the server's log`,
    '',
  );
}

function sendError(res, code, message, field) {
  sendJson(
    res,
    HTTP_STATUS_OF_ERROR[code] ?? 500,
    { error: { code, message, field: field ?? '' } },
    {},
  );
}

function sendJson(res, status, body, headers) {
  if (res.headersSent) {
    return;
  }
  res.statusCode = status;
  res.setHeader('content-type', 'application/json');
  for (const [name, value] of Object.entries(headers)) {
    res.setHeader(name, value);
  }
  res.end(JSON.stringify(body));
}

function locals(res) {
  if (res.locals === undefined || res.locals === null) {
    res.locals = {};
  }
  return res.locals;
}

function stringOrFunction(spec, where) {
  if (typeof spec === 'function') {
    return async (req) => spec(req);
  }
  if (typeof spec === 'string' && spec) {
    return async () => spec;
  }
  throw new TypeError(
    `${where}: expected a string or a function of req, got ${spec === null ? 'null' : typeof spec}`,
  );
}

function describe(value) {
  if (value === null) {
    return 'null';
  }
  if (Array.isArray(value)) {
    return 'array';
  }
  return typeof value === 'object' ? (value.constructor?.name ?? 'object') : typeof value;
}

function optionalFunction(spec, where) {
  if (spec === undefined) {
    return async () => undefined;
  }
  if (typeof spec === 'function') {
    return async (req) => spec(req);
  }
  throw new TypeError(
    `${where}: expected a function of req, got ${spec === null ? 'null' : typeof spec}`,
  );
}
