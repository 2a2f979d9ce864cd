// Values to the wire: each kind lands in its Value field, exactly, checked
// by encoding a DecideRequest with the real protos and decoding it again.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import * as protoLoader from '@grpc/proto-loader';

import { Duration, MAX_DEPTH, UInt64, toValue, toValueMap } from '../src/index.js';
import { REPO } from './daemon.js';

const definition = protoLoader.loadSync('kynara/v1/decision.proto', {
  includeDirs: [`${REPO}protos`],
  longs: String,
  enums: String,
  oneofs: true,
});
const decide = definition['kynara.v1.DecisionService'].Decide;

/** Encode `value` as a context entry and decode it again. */
function roundTrip(value) {
  const bytes = decide.requestSerialize({ action: 'a.b', context: { v: toValue(value) } });
  return decide.requestDeserialize(bytes).context.v;
}

test('safe integers are int_value, other numbers double_value', () => {
  assert.deepEqual(roundTrip(42), { kind: 'intValue', intValue: '42' });
  assert.deepEqual(roundTrip(-7), { kind: 'intValue', intValue: '-7' });
  assert.deepEqual(roundTrip(1.5), { kind: 'doubleValue', doubleValue: 1.5 });
  assert.deepEqual(roundTrip(2 ** 60), { kind: 'doubleValue', doubleValue: 2 ** 60 });
});

test('bigints stay exact: int64, then uint64 past it, else RangeError', () => {
  const max = 2n ** 63n - 1n;
  assert.deepEqual(roundTrip(max), { kind: 'intValue', intValue: max.toString() });
  assert.deepEqual(roundTrip(-(2n ** 63n)), {
    kind: 'intValue',
    intValue: (-(2n ** 63n)).toString(),
  });
  assert.deepEqual(roundTrip(2n ** 64n - 1n), {
    kind: 'uintValue',
    uintValue: '18446744073709551615',
  });
  assert.throws(() => toValue(2n ** 64n, 'context.n'), {
    name: 'RangeError',
    message: /^context\.n: expected an integer within int64 or uint64/,
  });
});

test('UInt64 makes a small integer unsigned', () => {
  assert.deepEqual(roundTrip(new UInt64(7)), { kind: 'uintValue', uintValue: '7' });
  assert.throws(() => new UInt64(-1), RangeError);
  assert.throws(() => new UInt64(1.5), RangeError);
});

test('strings, booleans, bytes and dates', () => {
  assert.deepEqual(roundTrip('DE'), { kind: 'stringValue', stringValue: 'DE' });
  assert.deepEqual(roundTrip(false), { kind: 'boolValue', boolValue: false });
  const view = new Uint8Array([9, 1, 2, 3, 9]).subarray(1, 4);
  const bytes = roundTrip(view);
  assert.equal(bytes.kind, 'bytesValue');
  assert.deepEqual([...bytes.bytesValue], [1, 2, 3]);
  assert.deepEqual([...roundTrip(Buffer.from('hi')).bytesValue], [104, 105]);
  const when = roundTrip(new Date(Date.UTC(2026, 0, 2, 3, 4, 5, 678)));
  assert.deepEqual(when, {
    kind: 'timestampValue',
    timestampValue: { seconds: String(Date.UTC(2026, 0, 2, 3, 4, 5) / 1000), nanos: 678_000_000 },
  });
  const before1970 = roundTrip(new Date(-1500)).timestampValue;
  assert.deepEqual(before1970, { seconds: '-2', nanos: 500_000_000 });
  assert.throws(() => toValue(new Date(NaN), 'context.when'), {
    name: 'RangeError',
    message: /^context\.when: expected a valid Date/,
  });
});

test('a Duration is duration_value, seconds and nanos of one sign', () => {
  assert.deepEqual(roundTrip(Duration.ofMillis(90_500)), {
    kind: 'durationValue',
    durationValue: { seconds: '90', nanos: 500_000_000 },
  });
  assert.deepEqual(roundTrip(Duration.ofMillis(-1500)).durationValue, {
    seconds: '-1',
    nanos: -500_000_000,
  });
  assert.deepEqual(roundTrip(Duration.ofMillis(-2000)).durationValue, { seconds: '-2', nanos: 0 });
  assert.deepEqual(roundTrip(new Duration(3n, 7)).durationValue, { seconds: '3', nanos: 7 });
  assert.throws(() => new Duration(1, -1), { name: 'RangeError', message: /one sign/ });
  assert.throws(() => new Duration(0, 1e9), RangeError);
  assert.throws(() => new Duration(315_576_000_001), RangeError);
  assert.throws(() => new Duration(1.5), RangeError);
  assert.throws(() => Duration.ofMillis(0.5), RangeError);
});

test('arrays are list_value and plain objects or Maps map_value', () => {
  const value = roundTrip({ items: [1, 'a'], nested: new Map([['k', true]]) });
  assert.equal(value.kind, 'mapValue');
  const { items, nested } = value.mapValue.entries;
  assert.deepEqual(
    items.listValue.values.map((item) => item[item.kind]),
    ['1', 'a'],
  );
  assert.deepEqual(nested.mapValue.entries.k, { kind: 'boolValue', boolValue: true });
});

test('values with no wire form are refused with their key path', () => {
  for (const bad of [null, undefined, () => 1, Symbol('s'), new (class Refund {})(), new Set()]) {
    assert.throws(() => toValueMap({ list: [0, { bad }] }, 'context'), {
      name: 'TypeError',
      message: /^context\.list\[1\]\.bad: expected boolean, number/,
    });
  }
  assert.throws(() => toValueMap([1], 'context'), /^TypeError: context: expected a plain object/);
  assert.throws(() => toValueMap(new Map([[1, 'x']]), 'context'), /expected string keys/);
  assert.deepEqual(Object.keys(toValueMap(undefined, 'context')), []);
});

test('nesting deeper than MAX_DEPTH, or a cycle, is refused', () => {
  let deep = 1;
  for (let i = 0; i < MAX_DEPTH; i += 1) deep = [deep];
  assert.doesNotThrow(() => toValue(deep));
  assert.throws(() => toValue([deep]), { name: 'RangeError', message: /nested at most 16 deep/ });
  const cycle = {};
  cycle.self = cycle;
  assert.throws(() => toValue(cycle), RangeError);
});

test('a sparse array is refused, naming the hole', () => {
  // eslint-disable-next-line no-sparse-arrays
  assert.throws(() => toValueMap({ l: [1, , 3] }, 'resource.attributes'), {
    name: 'TypeError',
    message: /^resource\.attributes\.l\[1\]: expected a value, got a hole/,
  });
  assert.throws(() => toValue(new Array(2), 'context.v'), { message: /^context\.v\[0\]: / });
  assert.deepEqual(
    roundTrip([0, 1]).listValue.values.map((item) => item.intValue),
    ['0', '1'],
  );
});

test('a `__proto__` key is carried as a key, in maps and nested maps', () => {
  const parsed = JSON.parse('{"__proto__": 5, "b": {"__proto__": true}}');
  const map = toValueMap(parsed, 'context');
  assert.deepEqual(Object.keys(map), ['__proto__', 'b']);
  const bytes = decide.requestSerialize({ action: 'a.b', context: map });
  const back = decide.requestDeserialize(bytes).context;
  assert.equal(back.__proto__.intValue, '5');
  assert.equal(back.b.mapValue.entries.__proto__.boolValue, true);
  const fromMap = toValueMap(new Map([['__proto__', 'x']]), 'context');
  assert.deepEqual(Object.keys(fromMap), ['__proto__']);
});

test('symbol keys and lone surrogates are refused, naming the key path', () => {
  assert.throws(() => toValueMap({ a: { [Symbol('s')]: 1 } }, 'context'), {
    name: 'TypeError',
    message: /^context\.a\[Symbol\(s\)\]: expected string keys, got a symbol key/,
  });
  assert.throws(() => toValueMap(new Map([[Symbol('m'), 1]]), 'context'), {
    name: 'TypeError',
    message: /^context\[Symbol\(m\)\]: expected string keys/,
  });
  assert.throws(() => toValueMap({ l: ['ok', 'bad\uD800'] }, 'resource.attributes'), {
    name: 'TypeError',
    message: /^resource\.attributes\.l\[1\]: expected well-formed text, got a lone surrogate at index 3/,
  });
  assert.throws(() => toValueMap({ ['k\uDC00']: 1 }, 'context'), {
    name: 'TypeError',
    message: /^context key "k\\udc00": expected well-formed text/,
  });
  // A surrogate pair is well formed and travels as it is.
  assert.equal(roundTrip('\u{1F600}').stringValue, '\u{1F600}');
});
