// @kynara/sdk: ask a Kynara sidecar whether an agent may act.
export {
  Client,
  DEFAULT_APPROVAL_TIMEOUT_MS,
  DEFAULT_TARGET,
  DEFAULT_TIMEOUT_MS,
  MAX_TIMEOUT_MS,
  SECRET_FILE_ENV,
  TARGET_ENV,
  resolveProtoRoot,
  resolveTarget,
} from './client.js';
export * from './errors.js';
export {
  FAIL_OPEN_CODES,
  closeDefaultClients,
  currentDecision,
  defaultClient,
  guard,
} from './guard.js';
export {
  APPROVAL_HEADER,
  APPROVAL_URL_HEADER,
  DECISION_HEADER,
  DECISION_ID_HEADER,
  HTTP_STATUS_OF_ERROR,
  kynaraMiddleware,
  refusalBody,
} from './middleware.js';
export { actingFor, currentSubject } from './subject.js';
export { Duration, MAX_DEPTH, UInt64, toValue, toValueMap } from './values.js';
