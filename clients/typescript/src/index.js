// @kynara/sdk: ask a Kynara sidecar whether an agent may act.
export {
  Client,
  DEFAULT_TARGET,
  DEFAULT_TIMEOUT_MS,
  SECRET_FILE_ENV,
  TARGET_ENV,
  resolveTarget,
} from './client.js';
export * from './errors.js';
export { MAX_DEPTH, UInt64, toValue, toValueMap } from './values.js';
