// JavaScript values to the wire's typed `kynara.v1.Value`, exactly.
//
// The daemon keeps integers exact end to end and a timestamp a timestamp, so
// this conversion refuses what it would have to guess at: a bigint beyond
// int64/uint64, an invalid Date, a class instance it does not know, lists and
// maps nested deeper than the daemon reads (MAX_DEPTH; a structure that
// contains itself is one). Every error names the key path, such as
// `context.items[2].when`, so the caller can find the bad value in a nested
// structure. The rules mirror the Python SDK's (kynara_sdk/_values.py).
//
// The objects built here are what @grpc/proto-loader serializes: 64-bit
// integers travel as decimal strings so that no digit is lost on the way.

/** Lists and maps nested in one value at most: the daemon's limit. */
export const MAX_DEPTH = 16;

const MIN_INT64 = -(2n ** 63n);
const MAX_INT64 = 2n ** 63n - 1n;
const MAX_UINT64 = 2n ** 64n - 1n;

/**
 * Marks an integer as unsigned 64-bit (CEL `uint`).
 *
 * A plain number or bigint travels as int64 when it fits and as uint64 only
 * when it is too large for int64; wrap it to make a small value unsigned
 * too, e.g. `new UInt64(7)` for a policy comparing against `7u`.
 */
export class UInt64 {
  /** @param {number | bigint | string} value an integer in [0, 2**64-1] */
  constructor(value) {
    if (typeof value === 'number' && !Number.isSafeInteger(value)) {
      throw new RangeError(`UInt64: expected a safe integer number, got ${value}; pass a bigint`);
    }
    let exact;
    try {
      exact = BigInt(value);
    } catch {
      throw new TypeError(`UInt64: expected an integer, got ${describe(value)} ${String(value)}`);
    }
    if (exact < 0n || exact > MAX_UINT64) {
      throw new RangeError(`UInt64: expected an integer within [0, 2**64-1], got ${exact}`);
    }
    /** @readonly */
    this.value = exact;
    Object.freeze(this);
  }

  toString() {
    return this.value.toString();
  }
}

// A protobuf Duration spans at most 10,000 years either way.
const MAX_DURATION_SECONDS = 315_576_000_000n;
const NANOS_PER_SECOND = 1_000_000_000;

/**
 * A length of time (CEL `duration`), e.g. `Duration.ofMillis(90_000)` for a
 * policy comparing against `duration('90s')`. JavaScript has no duration
 * type of its own, so a plain number is never taken for one.
 */
export class Duration {
  /**
   * @param {number | bigint} seconds whole seconds, within ±315,576,000,000
   * @param {number} [nanos] nanoseconds, |nanos| < 1e9, with the sign of
   *   `seconds` (as protobuf's Duration has them)
   */
  constructor(seconds, nanos = 0) {
    if (typeof seconds === 'number' && !Number.isSafeInteger(seconds)) {
      throw new RangeError(
        `Duration: expected whole seconds as a safe integer or bigint, got ${seconds}`,
      );
    }
    if (typeof seconds !== 'number' && typeof seconds !== 'bigint') {
      throw new TypeError(
        `Duration: expected seconds as a number or bigint, got ${describe(seconds)}`,
      );
    }
    const whole = BigInt(seconds);
    if (whole < -MAX_DURATION_SECONDS || whole > MAX_DURATION_SECONDS) {
      throw new RangeError(
        `Duration: expected seconds within ±${MAX_DURATION_SECONDS}, got ${whole}`,
      );
    }
    if (!Number.isSafeInteger(nanos) || Math.abs(nanos) >= NANOS_PER_SECOND) {
      throw new RangeError(`Duration: expected nanos an integer with |nanos| < 1e9, got ${nanos}`);
    }
    if ((whole > 0n && nanos < 0) || (whole < 0n && nanos > 0)) {
      throw new RangeError(
        `Duration: expected seconds and nanos of one sign, got ${whole} s and ${nanos} ns`,
      );
    }
    /** @readonly */
    this.seconds = whole;
    /** @readonly */
    this.nanos = nanos;
    Object.freeze(this);
  }

  /** A Duration of `millis` milliseconds (an integer, negative for a span back). */
  static ofMillis(millis) {
    if (!Number.isSafeInteger(millis)) {
      throw new RangeError(
        `Duration.ofMillis: expected an integer number of milliseconds, got ${millis}`,
      );
    }
    // Seconds and nanos share the sign: split the magnitude, sign both.
    const sign = millis < 0 ? -1 : 1;
    const magnitude = Math.abs(millis);
    return new Duration(
      sign * Math.floor(magnitude / 1000),
      sign * (magnitude % 1000) * 1_000_000 || 0,
    );
  }

  toString() {
    return `Duration(${this.seconds}s, ${this.nanos}ns)`;
  }
}

/**
 * Convert one value to a wire `Value` object.
 *
 * @param {unknown} value
 * @param {string} [path] where the value sits, used in error messages
 * @throws {TypeError} a value or key has no wire form
 * @throws {RangeError} an integer is out of range, a Date is invalid, or the
 *   nesting is deeper than MAX_DEPTH
 */
export function toValue(value, path = 'value') {
  return fill(value, path, 0);
}

/**
 * Convert a plain object (or Map) of string keys to values into a map of
 * wire `Value` objects; `undefined` and `null` are an empty map.
 *
 * @param {unknown} values
 * @param {string} path where the map sits, e.g. `resource.attributes`
 */
export function toValueMap(values, path) {
  if (values === undefined || values === null) {
    return Object.create(null);
  }
  // No prototype: a `__proto__` key is an own entry like any other, not a
  // prototype to set (which would drop it silently).
  const out = Object.create(null);
  for (const [key, item] of entriesOf(values, path)) {
    out[key] = fill(item, `${path}.${key}`, 0);
  }
  return out;
}

/**
 * Refuse a string that is not well-formed UTF-16 (a lone surrogate): the
 * wire carries UTF-8, and the encoder would put U+FFFD in its place, so the
 * daemon would see another value than the one given.
 *
 * @param {string} value
 * @param {string} path where the string sits, for the error message
 * @returns {string} `value`
 * @throws {TypeError} naming `path` and the surrogate's index
 */
export function checkString(value, path) {
  if (typeof value !== 'string') {
    throw new TypeError(`${path}: expected a string, got ${describe(value)}`);
  }
  if (!value.isWellFormed()) {
    const index = [...value.matchAll(LONE_SURROGATE)][0]?.index ?? 0;
    throw new TypeError(
      `${path}: expected well-formed text, got a lone surrogate at index ${index}` +
        ' (it has no UTF-8 form)',
    );
  }
  return value;
}

const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/g;

function fill(value, path, depth) {
  switch (typeof value) {
    case 'boolean':
      return { boolValue: value };
    case 'string':
      return { stringValue: checkString(value, path) };
    case 'number':
      // A safe integer is exact as int64; anything else (a fraction, a
      // number past 2**53, NaN, Infinity) is what JavaScript holds: a double.
      return Number.isSafeInteger(value) ? { intValue: String(value) } : { doubleValue: value };
    case 'bigint':
      return fillBigint(value, path);
    case 'object':
      break;
    default:
      throw new TypeError(`${path}: ${typeMessage(value)}`);
  }
  if (value === null) {
    throw new TypeError(`${path}: ${typeMessage(value)}`);
  }
  if (value instanceof UInt64) {
    return { uintValue: value.value.toString() };
  }
  if (value instanceof Uint8Array) {
    // Buffer is a Uint8Array; copy the view's bytes only.
    return { bytesValue: Buffer.from(value.buffer, value.byteOffset, value.byteLength) };
  }
  if (value instanceof Date) {
    return { timestampValue: timestamp(value, path) };
  }
  if (value instanceof Duration) {
    return { durationValue: { seconds: value.seconds.toString(), nanos: value.nanos } };
  }
  if (Array.isArray(value)) {
    checkDepth(path, depth);
    const values = [];
    for (let index = 0; index < value.length; index += 1) {
      // A hole (`[1, , 3]`, `new Array(2)`) is no value; map() would skip it
      // and leave a hole the encoder fails on.
      if (!Object.hasOwn(value, index)) {
        throw new TypeError(
          `${path}[${index}]: expected a value, got a hole (a sparse array's missing element)`,
        );
      }
      values.push(fill(value[index], `${path}[${index}]`, depth + 1));
    }
    return { listValue: { values } };
  }
  if (value instanceof Map || isPlainObject(value)) {
    checkDepth(path, depth);
    const entries = Object.create(null);
    for (const [key, item] of entriesOf(value, path)) {
      entries[key] = fill(item, `${path}.${key}`, depth + 1);
    }
    return { mapValue: { entries } };
  }
  throw new TypeError(`${path}: ${typeMessage(value)}`);
}

function fillBigint(value, path) {
  if (value >= MIN_INT64 && value <= MAX_INT64) {
    return { intValue: value.toString() };
  }
  if (value > MAX_INT64 && value <= MAX_UINT64) {
    // Too large for int64 but exact as uint64: keep it exact rather than
    // fail a caller who never thought about signedness.
    return { uintValue: value.toString() };
  }
  throw new RangeError(
    `${path}: expected an integer within int64 or uint64 [-2**63, 2**64-1], got ${value}`,
  );
}

function timestamp(value, path) {
  const millis = value.getTime();
  if (Number.isNaN(millis)) {
    throw new RangeError(`${path}: expected a valid Date, got an invalid one`);
  }
  // Protobuf Timestamp nanos are never negative: floor the seconds.
  const seconds = Math.floor(millis / 1000);
  const nanos = (millis - seconds * 1000) * 1_000_000;
  return { seconds: String(seconds), nanos };
}

function checkDepth(path, depth) {
  if (depth >= MAX_DEPTH) {
    throw new RangeError(
      `${path}: expected lists and maps nested at most ${MAX_DEPTH} deep,` +
        ' got deeper (or an array or object that contains itself)',
    );
  }
}

function entriesOf(values, path) {
  if (values instanceof Map) {
    for (const key of values.keys()) {
      if (typeof key !== 'string') {
        const named = typeof key === 'symbol' ? `[${String(key)}]` : '';
        throw new TypeError(`${path}${named}: expected string keys, got ${describe(key)} key`);
      }
      checkString(key, `${path} key ${JSON.stringify(key)}`);
    }
    return values.entries();
  }
  if (!isPlainObject(values)) {
    throw new TypeError(
      `${path}: expected a plain object of string keys to values, got ${describe(values)}`,
    );
  }
  const symbols = Object.getOwnPropertySymbols(values);
  if (symbols.length > 0) {
    // Object.entries would skip it: refuse rather than drop it silently.
    throw new TypeError(
      `${path}[${String(symbols[0])}]: expected string keys, got a symbol key`,
    );
  }
  const entries = Object.entries(values);
  for (const [key] of entries) {
    checkString(key, `${path} key ${JSON.stringify(key)}`);
  }
  return entries;
}

function isPlainObject(value) {
  if (typeof value !== 'object' || value === null) {
    return false;
  }
  const proto = Object.getPrototypeOf(value);
  return proto === Object.prototype || proto === null;
}

function typeMessage(value) {
  return (
    'expected boolean, number, bigint, UInt64, string, Uint8Array, Date, Duration,' +
    ` array or plain object, got ${describe(value)}`
  );
}

/** A value's kind for an error message: `null`, `array`, a class name or a typeof. */
export function describe(value) {
  if (value === null) {
    return 'null';
  }
  if (Array.isArray(value)) {
    return 'array';
  }
  if (typeof value === 'object') {
    return value.constructor?.name ?? 'object';
  }
  return typeof value;
}
