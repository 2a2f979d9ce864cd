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
// answer was not allow).

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

/** Base of every SDK error; `code` is the stable code to branch on. */
export class KynaraError extends Error {
  /**
   * @param {string} code a stable code, e.g. INVALID_REQUEST
   * @param {string} message for people; never branch on it
   * @param {string} [field] the request field at fault, e.g. `resource.kind`
   */
  constructor(code, message, field = '') {
    super(`[${code}]${field ? ` (field ${field})` : ''} ${message}`);
    this.name = new.target.name;
    this.code = code;
    this.field = field;
    this.detail = message;
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
