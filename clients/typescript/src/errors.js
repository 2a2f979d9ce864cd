// The SDK's errors and the stable codes callers branch on, as the Python
// SDK has them (kynara_sdk/errors.py).
//
// Every error the SDK raises for a decision is a KynaraError carrying `code`,
// a stable lower-snake-case string. Match on the code (or the class), never
// on the message text. Codes from the daemon's catalogue (ErrorCode in
// protos/kynara/v1/decision.proto) arrive as the trailing metadata
// `kynara-error-code`; three codes are the SDK's own: `daemon_unreachable`
// (no answer came back: no daemon, a broken connection, a passed deadline),
// `permission_denied` and `approval_required` (the daemon answered, and the
// answer was not allow), `approval_timeout` (a wait on an approval ended
// before any reviewer resolved it; the approval stays pending),
// `client_closed` (the Client was closed before or during the call) and
// `unexpected_status` (a gRPC status without the daemon's code: the target
// is not the daemon's agent socket, or the call failed on the client side).
//
// `fromDaemon` is true only when the code came from the daemon itself (its
// `kynara-error-code` trailer, or an error item of its batch answer): the
// difference between "the daemon said internal" and "something said so".
//
// A wait that ends with the approval rejected, expired or used elsewhere
// throws an ApprovalError coded `approval_rejected`, `approval_expired` or
// `approval_used`: the reason codes a retry with that approval would get. A
// wait the daemon refuses (`not_found` for an id naming no approval of this
// agent) throws an ApprovalError with the daemon's code, so every end of a
// wait carries the `approvalId` waited on and the `decisionId` that asked.

// From the daemon's ErrorCode catalogue: no answer was given.
export const INVALID_REQUEST = 'invalid_request';
export const POLICY_NOT_READY = 'policy_not_ready';
export const AUDIT_UNAVAILABLE = 'audit_unavailable';
export const IDENTITY_INVALID = 'identity_invalid';
export const REQUEST_TOO_LARGE = 'request_too_large';
export const SHUTTING_DOWN = 'shutting_down';
export const INTERNAL = 'internal';

// The SDK's own.
export const DAEMON_UNREACHABLE = 'daemon_unreachable';
export const PERMISSION_DENIED = 'permission_denied';
export const APPROVAL_REQUIRED = 'approval_required';
export const APPROVAL_TIMEOUT = 'approval_timeout';
export const CLIENT_CLOSED = 'client_closed';
export const UNEXPECTED_STATUS = 'unexpected_status';

// The daemon's reason codes for an approval that cannot be used.
export const APPROVAL_REJECTED = 'approval_rejected';
export const APPROVAL_EXPIRED = 'approval_expired';
export const APPROVAL_USED = 'approval_used';

/** Base of every SDK error; `code` is the stable code to branch on. */
export class KynaraError extends Error {
  /**
   * @param {string} code a stable code, e.g. INVALID_REQUEST
   * @param {string} message for people; never branch on it
   * @param {string} [field] the request field at fault, e.g. `resource.kind`
   * @param {object} [more]
   * @param {boolean} [more.fromDaemon] the code is the daemon's own, read
   *   from its answer (never set for an error the SDK made up)
   */
  constructor(code, message, field = '', { fromDaemon = false } = {}) {
    super(`[${code}]${field ? ` (field ${field})` : ''} ${message}`);
    this.name = new.target.name;
    this.code = code;
    this.field = field;
    this.detail = message;
    this.fromDaemon = fromDaemon;
  }
}

/** The daemon gave no answer: not listening, disconnected or too slow. */
export class KynaraUnavailable extends KynaraError {
  constructor(message) {
    super(DAEMON_UNREACHABLE, message);
  }
}

/** The daemon answered deny; `decision` is the full answer. */
export class PermissionDenied extends KynaraError {
  /** @param {import('../index.js').Decision} decision */
  constructor(decision) {
    super(
      PERMISSION_DENIED,
      `denied: ${decision.reasonCode}` +
        (decision.reason ? ` (${decision.reason})` : '') +
        `; decision ${decision.decisionId}`,
    );
    this.decision = decision;
    this.decisionId = decision.decisionId;
    this.reasonCode = decision.reasonCode;
  }
}

/** The daemon answered require_approval; a reviewer must approve first. */
export class ApprovalRequired extends KynaraError {
  /** @param {import('../index.js').Decision} decision */
  constructor(decision) {
    const approval = decision.approval;
    const url = approval?.url ?? '';
    super(
      APPROVAL_REQUIRED,
      `approval required${url ? ` at ${url}` : ''}; decision ${decision.decisionId}`,
    );
    this.decision = decision;
    this.decisionId = decision.decisionId;
    this.reasonCode = decision.reasonCode;
    this.approvalId = approval?.id ?? '';
    this.approvalUrl = url;
    this.expiresAt = approval?.expiresAt ?? null;
  }
}

/**
 * A wait on an approval ended without a grant to use. `code` is
 * APPROVAL_TIMEOUT, APPROVAL_REJECTED, APPROVAL_EXPIRED, APPROVAL_USED, or
 * the daemon's code when it refused the wait (e.g. `not_found`).
 */
export class ApprovalError extends KynaraError {
  /**
   * @param {string} code the stable code
   * @param {string} approvalId the approval waited on
   * @param {string} message for people; never branch on it
   * @param {object} [more]
   * @param {string} [more.decisionId] the require_approval decision that asked
   * @param {import('../index.js').ApprovalUpdate | null} [more.update] the last state seen
   * @param {string} [more.field] the request field at fault, as the daemon named it
   */
  constructor(
    code,
    approvalId,
    message,
    { decisionId = '', update = null, field = '', fromDaemon = false } = {},
  ) {
    super(
      code,
      `approval ${approvalId}: ${message}${decisionId ? `; decision ${decisionId}` : ''}`,
      field,
      { fromDaemon },
    );
    this.approvalId = approvalId;
    this.decisionId = decisionId;
    this.update = update;
  }
}

/**
 * The wait ended before any reviewer resolved the approval. It is still
 * pending: a reviewer may approve it later, and a retry with its id then
 * succeeds. Never a rejection.
 */
export class ApprovalTimeout extends ApprovalError {
  constructor(approvalId, message, more = {}) {
    super(APPROVAL_TIMEOUT, approvalId, message, more);
  }
}

/** A reviewer rejected the approval; `update.comment` says why. */
export class ApprovalRejected extends ApprovalError {
  constructor(approvalId, message, more = {}) {
    super(APPROVAL_REJECTED, approvalId, message, more);
  }
}

/** The approval expired before it was approved (or before its use). */
export class ApprovalExpired extends ApprovalError {
  constructor(approvalId, message, more = {}) {
    super(APPROVAL_EXPIRED, approvalId, message, more);
  }
}
