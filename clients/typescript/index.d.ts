// Type declarations for @kynara/sdk (the code is plain ESM JavaScript in src/).

/** The environment variable naming the daemon to dial. */
export const TARGET_ENV: 'KYNARA_TARGET';
/** A file holding this agent's bearer secret, for a daemon serving several agents. */
export const SECRET_FILE_ENV: 'KYNARA_AGENT_SECRET_FILE';
/** Where a Kynara sidecar serves its agent by convention. */
export const DEFAULT_TARGET: 'unix:///run/kynara/agent.sock';
/** Milliseconds per call unless `timeoutMs` says otherwise. */
export const DEFAULT_TIMEOUT_MS: number;
/** Milliseconds a wait on an approval lasts unless `timeoutMs` / `approvalTimeoutMs` says otherwise (5 minutes). */
export const DEFAULT_APPROVAL_TIMEOUT_MS: number;
/**
 * The longest `timeoutMs` / `approvalTimeoutMs` taken: 2**31-1 ms (about
 * 24.8 days), the longest delay a Node timer (and so grpc-js's deadline)
 * holds. A longer one is a RangeError naming the option.
 */
export const MAX_TIMEOUT_MS: number;
/** Lists and maps nested in one value at most: the daemon's limit. */
export const MAX_DEPTH: number;

/**
 * The target to dial: `target`, else `$KYNARA_TARGET`, else DEFAULT_TARGET.
 * @throws TypeError `target` is given and not a string
 */
export function resolveTarget(target?: string): string;

/**
 * The directory holding kynara/v1/decision.proto: `protoRoot` when given
 * (it must hold them), else the package's own copy, else the repository's.
 */
export function resolveProtoRoot(protoRoot?: string): string;

/** Marks an integer as unsigned 64-bit (CEL `uint`), e.g. `new UInt64(7)`. */
export class UInt64 {
  constructor(value: number | bigint | string);
  readonly value: bigint;
}

/**
 * A length of time (CEL `duration`), e.g. `Duration.ofMillis(90_000)`.
 * Seconds and nanos share a sign, as protobuf's Duration has them.
 */
export class Duration {
  /** @throws RangeError seconds past ±315,576,000,000, |nanos| >= 1e9, or signs that differ */
  constructor(seconds: number | bigint, nanos?: number);
  static ofMillis(millis: number): Duration;
  readonly seconds: bigint;
  readonly nanos: number;
}

/**
 * What travels as a `kynara.v1.Value`: a safe-integer number as int64, any
 * other number as double, bigint as int64 (uint64 past int64), UInt64 as
 * uint64, Uint8Array/Buffer as bytes, Date as a timestamp, Duration as a
 * duration, arrays as lists, plain objects and string-keyed Maps as maps.
 * Refused before sending, naming the key path: a sparse array's hole, a
 * symbol key, a string or key with a lone surrogate. A `__proto__` key is
 * carried like any other.
 */
export type KynaraValue =
  | boolean
  | number
  | bigint
  | UInt64
  | string
  | Uint8Array
  | Date
  | Duration
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
  /** The expiry to the millisecond (a Date holds no finer). */
  readonly expiresAt: Date | null;
  /** The expiry exactly, as the daemon writes it: RFC 3339 UTC, nanoseconds kept, e.g. "2026-12-05T12:00:00.925235Z"; "" when unset. */
  readonly expiresAtText: string;
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

/** One state of an approval, as `waitApproval` sees it. */
export interface ApprovalUpdate {
  readonly approvalId: string;
  /** "pending", "approved", "rejected", "expired" or "used". */
  readonly state: string;
  /** Distinct approvals so far, out of `approvalsNeeded`. */
  readonly approvals: number;
  readonly approvalsNeeded: number;
  readonly expiresAt: Date | null;
  /** The expiry as RFC 3339 text, as `Approval.expiresAtText`; "" when unset. */
  readonly expiresAtText: string;
  readonly reviewers: readonly string[];
  /** A rejecting reviewer's comment. */
  readonly comment: string;
}

/**
 * Who a call acts for: exactly one of `user`, `chain` (the user first, then
 * any intermediate agents; the daemon appends its own agent) or `token` (a
 * delegation token).
 */
export type Subject =
  | { readonly user: string; readonly chain?: undefined; readonly token?: undefined }
  | { readonly chain: readonly string[]; readonly user?: undefined; readonly token?: undefined }
  | { readonly token: string; readonly user?: undefined; readonly chain?: undefined };

/** The subject as resolved: a chain, or a token (the other empty). */
export interface ResolvedSubject {
  readonly chain: readonly string[];
  readonly token: string;
}

/**
 * Run `fn` with every decision inside it (across awaits, timers and promise
 * chains) acting for `subject`; returns what `fn` returns. Blocks nest, the
 * innermost wins whole; a call's own user/chain/token wins over it.
 * @throws TypeError the subject names none, or more than one, or is malformed
 */
export function actingFor<T>(subject: Subject, fn: () => T): T;
/** The subject of the innermost `actingFor`, or null outside any. */
export function currentSubject(): ResolvedSubject | null;

/**
 * What `decide` takes besides the action. Every field named here that is
 * given must be of its type (strings are strings: an array or object is a
 * TypeError naming the option, never stringified), and any other key is
 * refused as an unknown option.
 */
export interface DecideOptions {
  /** Dotted resource kind, e.g. "payments.refund". */
  resourceKind: string;
  resourceId?: string;
  /** Resource attributes; policies see them as `resource.attr`. */
  attributes?: ValueMap;
  /** Caller context; policies see it as `context`. */
  context?: ValueMap;
  /**
   * The user acted for (development identity mode). At most one of user,
   * chain, token; none means the innermost `actingFor`'s subject.
   */
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

/** Any other key is refused (TypeError naming it). */
export interface ClientOptions {
  /** `unix:///path` or `host:port`; default `$KYNARA_TARGET`, else DEFAULT_TARGET. */
  target?: string;
  /** Per call, at most MAX_TIMEOUT_MS; a passed deadline is daemon_unreachable. */
  timeoutMs?: number;
  /** This agent's bearer secret; default `$KYNARA_AGENT_SECRET_FILE`. */
  secretFile?: string;
  /** This agent's client certificate (PEM, leaf first) for the daemon's TLS port (`agent.tls`, a `host:port` target); give keyFile with it. */
  certFile?: string;
  /** The client certificate's unencrypted PEM private key. */
  keyFile?: string;
  /** The CA certificate(s) that signed the daemon's serving certificate (PEM); default the system's roots. */
  caFile?: string;
  /** The directory holding kynara/v1/decision.proto; default the package's copy, else the repository's protos/. */
  protoRoot?: string;
}

/** One item of a batch: `decide`'s action and options together. */
export interface BatchItem extends DecideOptions {
  action: string;
}

export interface WaitApprovalOptions {
  /** How long to wait at most (at most MAX_TIMEOUT_MS); default DEFAULT_APPROVAL_TIMEOUT_MS. */
  timeoutMs?: number;
  /** The require_approval decision that asked, attached to the errors. */
  decisionId?: string;
}

export class Client {
  constructor(options?: ClientOptions);
  readonly target: string;
  readonly timeoutMs: number;
  /** Allow, deny or require_approval; rejects with a KynaraError when no answer was given. */
  decide(action: string, options: DecideOptions): Promise<Decision>;
  /** Resolves only for an allow; rejects with PermissionDenied or ApprovalRequired otherwise. */
  enforce(action: string, options: DecideOptions): Promise<Decision>;
  /**
   * One call, each item answered on its own and in order: its Decision, or
   * the KynaraError saying why that item got no answer (its `field` names
   * the item, e.g. `items[3].resource.kind`). Rejects with a KynaraError when
   * the batch as a whole got no answer, and with a TypeError/RangeError
   * naming `items[i]` when an item is malformed (nothing was sent).
   */
  decideBatch(items: Iterable<BatchItem>): Promise<Array<Decision | KynaraError>>;
  /**
   * Wait until a reviewer resolves one of this agent's approvals; resolves
   * with the `approved` update (retry with `approvalId` to use the grant).
   * Rejects with ApprovalTimeout (it stays pending; only when the daemon
   * sent the approval's state at least once), ApprovalRejected,
   * ApprovalExpired, ApprovalError (`approval_used`, `client_closed`, or the
   * daemon's code such as `not_found`), or KynaraUnavailable (no answer:
   * also a deadline passed before the first state came). Ending the wait
   * never changes the approval.
   */
  waitApproval(approvalId: string, options?: WaitApprovalOptions): Promise<ApprovalUpdate>;
  /**
   * Close the channel. Calls and waits in flight reject at once with code
   * `client_closed`, and so do calls made after.
   */
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
export const APPROVAL_TIMEOUT: 'approval_timeout';
export const APPROVAL_REJECTED: 'approval_rejected';
export const APPROVAL_EXPIRED: 'approval_expired';
export const APPROVAL_USED: 'approval_used';
/** The Client was closed before or during the call: no word on the daemon. */
export const CLIENT_CLOSED: 'client_closed';
/** A gRPC status without the daemon's error code: not its answer (another server or socket, or a failure in the client). */
export const UNEXPECTED_STATUS: 'unexpected_status';

/** Base of every SDK error; branch on `code`, never on the message. */
export class KynaraError extends Error {
  constructor(code: string, message: string, field?: string, more?: { fromDaemon?: boolean });
  readonly code: string;
  /** True only when the code is the daemon's own (its error trailer or batch answer). */
  readonly fromDaemon: boolean;
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

export interface ApprovalErrorDetails {
  /** The require_approval decision that asked for the approval. */
  decisionId?: string;
  /** The approval's last state seen. */
  update?: ApprovalUpdate | null;
  /** The request field at fault, as the daemon named it. */
  field?: string;
  /** The code is the daemon's own. */
  fromDaemon?: boolean;
}

/**
 * A wait on an approval ended without a grant to use. `code` is
 * approval_timeout, approval_rejected, approval_expired, approval_used, or
 * the daemon's code when it refused the wait (e.g. `not_found`).
 */
export class ApprovalError extends KynaraError {
  constructor(code: string, approvalId: string, message: string, details?: ApprovalErrorDetails);
  readonly approvalId: string;
  /** The require_approval decision that asked, or "" when not known. */
  readonly decisionId: string;
  readonly update: ApprovalUpdate | null;
}

/** No reviewer resolved the approval in time; it stays pending (never a rejection). */
export class ApprovalTimeout extends ApprovalError {
  constructor(approvalId: string, message: string, details?: ApprovalErrorDetails);
  readonly code: 'approval_timeout';
}

/** A reviewer rejected the approval; `update.comment` says why. */
export class ApprovalRejected extends ApprovalError {
  constructor(approvalId: string, message: string, details?: ApprovalErrorDetails);
  readonly code: 'approval_rejected';
}

/** The approval expired before it was approved. */
export class ApprovalExpired extends ApprovalError {
  constructor(approvalId: string, message: string, details?: ApprovalErrorDetails);
  readonly code: 'approval_expired';
}

/** Where failOpen warnings go: a function of one line, or an object with warn() (console, pino, ...). */
export type Logger = ((line: string) => void) | { warn(line: string): void };

/**
 * The codes failOpen lets a call through on: the daemon could not answer
 * now (daemon_unreachable, policy_not_ready, audit_unavailable,
 * shutting_down, internal). All but daemon_unreachable count only when the
 * daemon itself sent them (`fromDaemon`). A refused request
 * (invalid_request, identity_invalid, request_too_large) and every
 * client-side failure (a value with no wire form, client_closed,
 * unexpected_status) always fail closed.
 */
export const FAIL_OPEN_CODES: readonly string[];

interface FailOpenOptions {
  /**
   * Let a call through, with no decision, when the daemon could not answer
   * (FAIL_OPEN_CODES), logging a warning naming the action and the code
   * each time. Never overrides an answer. Default false: fail closed.
   */
  failOpen?: boolean;
  /** Where the failOpen warning goes; default console.warn. */
  logger?: Logger;
}

/**
 * How a guarded function's arguments become the request. Each of
 * resourceId, attributes, context is either a function of the call's
 * arguments, or (for a function taking one plain object) property names
 * picked from that object: a name for resourceId, an array of names for
 * attributes and context (a property the object lacks stays absent).
 */
/** Any other key is refused (TypeError naming it, e.g. a misspelt `failopen`). */
export interface GuardOptions<Args extends unknown[] = any[]> extends FailOpenOptions {
  /** Dotted resource kind, e.g. "payments.refund". */
  resourceKind: string;
  /** A string, or an integer sent in decimal; none means no id. */
  resourceId?: string | ((...args: Args) => string | number | bigint | null | undefined);
  attributes?: readonly string[] | ((...args: Args) => ValueMap | undefined);
  context?: readonly string[] | ((...args: Args) => ValueMap | undefined);
  /** Default: the shared client for $KYNARA_TARGET (defaultClient()). */
  client?: Client;
  /**
   * On require_approval: 'throw' ApprovalRequired (the default), or 'wait'
   * for a reviewer, then retry with the grant and run the body on its allow.
   */
  onApproval?: 'throw' | 'wait';
  /** How long 'wait' waits, at most MAX_TIMEOUT_MS; default DEFAULT_APPROVAL_TIMEOUT_MS. */
  approvalTimeoutMs?: number;
  /**
   * With 'wait': awaited with the require_approval Decision (its
   * approval.url) just before the wait starts. What it throws ends the call.
   */
  onWait?: (decision: Decision) => void | Promise<void>;
}

/**
 * Wrap an async function so its body runs only on allow. The wrapped
 * function takes the same arguments (and `this`) and rejects before the
 * body with PermissionDenied (deny), ApprovalRequired (require_approval,
 * 'throw'), ApprovalTimeout / ApprovalRejected / ApprovalExpired (a wait
 * without a grant; each with the asking decisionId and the approvalId),
 * or the KynaraError of a call that got no answer. The subject is the
 * innermost `actingFor`.
 * @throws TypeError|RangeError an option is malformed (when the guard is made)
 */
export function guard<Args extends unknown[] = any[]>(
  action: string,
  options: GuardOptions<Args>,
): <R>(fn: (...args: Args) => R) => (...args: Args) => Promise<Awaited<R>>;

/** The allow that let the running guarded body start, or null (also when failOpen let it through). */
export function currentDecision(): Decision | null;
/** The shared Client for $KYNARA_TARGET, made on first use. */
export function defaultClient(): Client;
/** Close the shared clients; the next guarded call makes a fresh one. */
export function closeDefaultClients(): void;

/** The request header naming an approved approval: the retry after require_approval. */
export const APPROVAL_HEADER: 'kynara-approval-id';
export const DECISION_HEADER: 'kynara-decision';
export const DECISION_ID_HEADER: 'kynara-decision-id';
export const APPROVAL_URL_HEADER: 'kynara-approval-url';
/** The HTTP status of each error code that got no decision; any other is 500. */
export const HTTP_STATUS_OF_ERROR: Readonly<Record<string, number>>;

/** The 403 body of a deny or require_approval, as every Kynara HTTP door gives it. */
export interface RefusalBody {
  decision: 'deny' | 'require_approval';
  reason: string;
  reason_code: string;
  decision_id: string;
  /** When the answer concerns an approval; expires_at is the daemon's RFC 3339 UTC text (nanoseconds kept, as ext_authz gives it), or "". */
  approval?: { id: string; url: string; expires_at: string };
}

/** The body of a request that got no decision (400, 401, 413, 503, 500). */
export interface ErrorBody {
  error: { code: string; message: string; field: string };
}

export function refusalBody(decision: Decision): RefusalBody;

/** The parts of a request the middleware reads itself: the approval header. */
export interface MiddlewareRequest {
  headers: Record<string, string | string[] | undefined>;
  method?: string;
  url?: string;
}

/** The parts of a response the middleware uses: Express's and node:http's alike. */
export interface MiddlewareResponse {
  statusCode: number;
  readonly headersSent: boolean;
  setHeader(name: string, value: string): unknown;
  end(body?: string): unknown;
  locals?: Record<string, unknown>;
}

type OfRequest<Req, T> = (req: Req) => T | Promise<T>;

/** Any other key is refused (TypeError naming it). */
export interface MiddlewareOptions<Req extends MiddlewareRequest = MiddlewareRequest>
  extends FailOpenOptions {
  /** The action: a dotted name, or a function of the request (a non-string result is the app's fault: 500, logged). */
  action: string | OfRequest<Req, string>;
  resourceKind: string | OfRequest<Req, string>;
  resourceId?: OfRequest<Req, string | number | bigint | null | undefined>;
  attributes?: OfRequest<Req, ValueMap | undefined>;
  context?: OfRequest<Req, ValueMap | undefined>;
  /**
   * The subject the SERVER established, e.g. `req => req.user ? { user:
   * req.user.id } : null` after the app's own authentication. Never read it
   * from a header the caller sends. Null (no subject) answers 401.
   */
  subject: OfRequest<Req, Subject | null | undefined>;
  /** Default: the shared client for $KYNARA_TARGET (defaultClient()). */
  client?: Client;
  /**
   * The header a retry names its approved approval in: a lower-case HTTP
   * header name (as node:http keys them); default APPROVAL_HEADER; false for none.
   */
  approvalHeader?: string | false;
}

/**
 * An Express-style `(req, res, next)`; also serves node:http. Allow:
 * `next()` with the Decision at `res.locals.kynara` and `kynara-decision-id`
 * on the response. Deny and require_approval: 403 with RefusalBody and the
 * headers kynara-decision, kynara-decision-id, kynara-approval-url (when an
 * approval has a URL). No decision: 400/401/413/503/500 with ErrorBody,
 * never `next()` (unless failOpen, which sets `res.locals.kynara = null`).
 * Every 500 is logged through `logger` with its cause; its body names the
 * code (or the error's class), never the cause's text.
 * @throws TypeError an option is malformed (when the middleware is made)
 */
export function kynaraMiddleware<Req extends MiddlewareRequest = MiddlewareRequest>(
  options: MiddlewareOptions<Req>,
): (req: Req, res: MiddlewareResponse, next: () => void) => Promise<void>;
