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

import { Client } from './client.js';
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
  if (options === null || typeof options !== 'object') {
    throw new TypeError(`${where}: options expected an object`);
  }
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
  if (approvalHeader !== false && (typeof approvalHeader !== 'string' || !approvalHeader)) {
    throw new TypeError(`${where}: approvalHeader expected a header name, or false for none`);
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
      request = {
        resourceKind: await resourceKind(req),
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
      const value = req.headers?.[approvalHeader.toLowerCase()];
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
      sendFailure(res, err);
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
      expires_at: decision.approval.expiresAt?.toISOString() ?? '',
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

function sendFailure(res, err) {
  if (err instanceof KynaraError) {
    // The socket path of an unreachable daemon is no business of the caller's.
    const message =
      err.code === DAEMON_UNREACHABLE ? 'no answer from the Kynara daemon' : err.detail;
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
  sendError(res, INTERNAL, 'the decision could not be asked for', '');
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
