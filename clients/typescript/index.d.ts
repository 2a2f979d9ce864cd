// Type declarations for @kynara/sdk (the code is plain ESM JavaScript in src/).

/** The environment variable naming the daemon to dial. */
export const TARGET_ENV: 'KYNARA_TARGET';
/** A file holding this agent's bearer secret, for a daemon serving several agents. */
export const SECRET_FILE_ENV: 'KYNARA_AGENT_SECRET_FILE';
/** Where a Kynara sidecar serves its agent by convention. */
export const DEFAULT_TARGET: 'unix:///run/kynara/agent.sock';
/** Milliseconds per call unless `timeoutMs` says otherwise. */
export const DEFAULT_TIMEOUT_MS: number;
/** Lists and maps nested in one value at most: the daemon's limit. */
export const MAX_DEPTH: number;

/** The target to dial: `target`, else `$KYNARA_TARGET`, else DEFAULT_TARGET. */
export function resolveTarget(target?: string): string;

/** Marks an integer as unsigned 64-bit (CEL `uint`), e.g. `new UInt64(7)`. */
export class UInt64 {
  constructor(value: number | bigint | string);
  readonly value: bigint;
}

/**
 * What travels as a `kynara.v1.Value`: a safe-integer number as int64, any
 * other number as double, bigint as int64 (uint64 past int64), UInt64 as
 * uint64, Uint8Array/Buffer as bytes, Date as a timestamp, arrays as lists,
 * plain objects and string-keyed Maps as maps.
 */
export type KynaraValue =
  | boolean
  | number
  | bigint
  | UInt64
  | string
  | Uint8Array
  | Date
  | readonly KynaraValue[]
  | { readonly [key: string]: KynaraValue }
  | ReadonlyMap<string, KynaraValue>;

export type ValueMap = { readonly [key: string]: KynaraValue } | ReadonlyMap<string, KynaraValue>;

/** The wire object for one value, as @grpc/proto-loader serializes it. */
export function toValue(value: KynaraValue, path?: string): object;
export function toValueMap(values: ValueMap | null | undefined, path: string): Record<string, object>;

export type DecisionValue = 'allow' | 'deny' | 'require_approval';

export interface MatchedRule {
  readonly policy: string;
  readonly rule: string;
  readonly effect: DecisionValue | 'unspecified';
  readonly principal: string;
  /** True for a rule in shadow mode: recorded, never deciding. */
  readonly shadow: boolean;
}

export interface ConditionError {
  readonly policy: string;
  readonly rule: string;
  readonly principal: string;
  readonly message: string;
}

export interface Approval {
  readonly id: string;
  /** The review page for it. */
  readonly url: string;
  readonly expiresAt: Date | null;
  /** "pending", "approved", "rejected", "expired" or "used". */
  readonly state: string;
  readonly reviewers: readonly string[];
  /** 0..100. */
  readonly riskScore: number;
}

/** The daemon's answer to one request. Branch on `decision` or `reasonCode`, never on `reason`. */
export interface Decision {
  readonly decision: DecisionValue;
  /** True only for an allow. */
  readonly allowed: boolean;
  readonly decisionId: string;
  /** A lower-snake-case code, e.g. "rule_allowed", "no_rule_allows". */
  readonly reasonCode: string;
  readonly reason: string;
  readonly matchedRules: readonly MatchedRule[];
  readonly policyRevision: string;
  readonly directoryRevision: string;
  /** Where the answer sits in the audit log. */
  readonly auditSequence: bigint;
  /** Lower-case hex SHA-256 chain hash of the audit record. */
  readonly recordHash: string;
  /** Null unless the daemon filled one in (require_approval, or an approval used). */
  readonly approval: Approval | null;
  /** The resolved delegation chain, user first, the daemon's agent last. */
  readonly chain: readonly string[];
  readonly conditionErrors: readonly ConditionError[];
  readonly requestId: string;
}

export interface DecideOptions {
  /** Dotted resource kind, e.g. "payments.refund". */
  resourceKind: string;
  resourceId?: string;
  /** Resource attributes; policies see them as `resource.attr`. */
  attributes?: ValueMap;
  /** Caller context; policies see it as `context`. */
  context?: ValueMap;
  /** The user acted for (development identity mode). At most one of user, chain, token. */
  user?: string;
  /** The asserted chain, user first, then intermediate agents. */
  chain?: readonly string[];
  /** A delegation token (JWT with RFC 8693 `act` claims). */
  token?: string;
  /** Echoed in the answer and the audit record. */
  requestId?: string;
  /** Retry with an approved approval's grant. */
  approvalId?: string;
}

export interface ClientOptions {
  /** `unix:///path` or `host:port`; default `$KYNARA_TARGET`, else DEFAULT_TARGET. */
  target?: string;
  /** Per call; a passed deadline is daemon_unreachable. */
  timeoutMs?: number;
  /** This agent's bearer secret; default `$KYNARA_AGENT_SECRET_FILE`. */
  secretFile?: string;
  /** The directory holding kynara/v1/decision.proto; default the repository's protos/. */
  protoRoot?: string;
}

export class Client {
  constructor(options?: ClientOptions);
  readonly target: string;
  readonly timeoutMs: number;
  /** Allow, deny or require_approval; rejects with a KynaraError when no answer was given. */
  decide(action: string, options: DecideOptions): Promise<Decision>;
  /** Resolves only for an allow; rejects with PermissionDenied or ApprovalRequired otherwise. */
  enforce(action: string, options: DecideOptions): Promise<Decision>;
  close(): void;
}

export const INVALID_REQUEST: 'invalid_request';
export const POLICY_NOT_READY: 'policy_not_ready';
export const AUDIT_UNAVAILABLE: 'audit_unavailable';
export const IDENTITY_INVALID: 'identity_invalid';
export const REQUEST_TOO_LARGE: 'request_too_large';
export const SHUTTING_DOWN: 'shutting_down';
export const INTERNAL: 'internal';
export const DAEMON_UNREACHABLE: 'daemon_unreachable';
export const PERMISSION_DENIED: 'permission_denied';
export const APPROVAL_REQUIRED: 'approval_required';

/** Base of every SDK error; branch on `code`, never on the message. */
export class KynaraError extends Error {
  constructor(code: string, message: string, field?: string);
  readonly code: string;
  /** The request field at fault, e.g. "resource.kind", or "". */
  readonly field: string;
  /** The message without the code prefix. */
  readonly detail: string;
}

/** No answer: nothing listening, a broken connection or a passed deadline. */
export class KynaraUnavailable extends KynaraError {
  constructor(message: string);
  readonly code: 'daemon_unreachable';
}

export class PermissionDenied extends KynaraError {
  constructor(decision: Decision);
  readonly code: 'permission_denied';
  readonly decision: Decision;
  readonly decisionId: string;
  readonly reasonCode: string;
}

export class ApprovalRequired extends KynaraError {
  constructor(decision: Decision);
  readonly code: 'approval_required';
  readonly decision: Decision;
  readonly decisionId: string;
  readonly reasonCode: string;
  readonly approvalId: string;
  readonly approvalUrl: string;
  readonly expiresAt: Date | null;
}
