import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { encodeMessage } from "../../src/wire/codec.js";
import { decodeControl, encodeControl, MAX_CONTROL_BYTES, type ControlMsg } from "../../src/wire/control.js";
import { decodeClientMsg, decodeServerMsg, encodeSignal, MAX_RELAY_BYTES, MAX_SIGNAL_BYTES, type ClientMsg, type ServerMsg, type SignalData } from "../../src/wire/signal.js";
import { ProtocolError } from "../../src/errors.js";

const hex16 = fc.stringMatching(/^[0-9a-f]{16}$/);
const bytesN = (n: number) => fc.uint8Array({ minLength: n, maxLength: n });
const meta = fc.dictionary(fc.string({ minLength: 1, maxLength: 10 }).filter((k) => k !== "__proto__"), fc.string({ maxLength: 20 }), { maxKeys: 4 });
const peer = fc.record({ id: hex16, name: fc.string({ maxLength: 64 }), pub: bytesN(32), meta });
const conn = fc.string({ minLength: 1, maxLength: 20 });
const signalData: fc.Arbitrary<SignalData> = fc.oneof(
  fc.record({ kind: fc.constantFrom("offer" as const, "answer" as const), conn, sdp: fc.string({ maxLength: 300 }), sig: bytesN(64), mac: bytesN(32), tr: fc.constantFrom("relay" as const), probe: fc.constant(true) }, { requiredKeys: ["kind", "conn", "sdp", "sig", "mac"] }),
  fc.record({ kind: fc.constant("candidate" as const), conn, candidate: fc.option(fc.record({ candidate: fc.string({ maxLength: 100 }), sdpMid: fc.string({ maxLength: 5 }), sdpMLineIndex: fc.nat(3) }), { nil: null }) }),
  fc.record({ kind: fc.constant("bye" as const), conn }),
);
const serverMsg: fc.Arbitrary<ServerMsg> = fc.oneof(
  fc.record({ t: fc.constant("challenge" as const), nonce: bytesN(32), server: fc.string({ maxLength: 20 }) }),
  fc.record({ t: fc.constant("welcome" as const), you: fc.record({ id: hex16, addr: fc.string({ maxLength: 40 }) }), peers: fc.array(peer, { maxLength: 5 }), stunPort: fc.nat(65535) }),
  fc.record({ t: fc.constant("join" as const), peer }),
  fc.record({ t: fc.constant("leave" as const), id: hex16 }),
  fc.record({ t: fc.constant("signal" as const), from: hex16, data: signalData }),
  fc.record({ t: fc.constant("relay" as const), from: hex16, data: fc.uint8Array({ maxLength: 2000 }) }),
  fc.record({ t: fc.constant("error" as const), code: fc.string({ maxLength: 20 }), msg: fc.string({ maxLength: 50 }), ref: hex16 }),
);
const clientMsg: fc.Arbitrary<ClientMsg> = fc.oneof(
  fc.record({ t: fc.constant("hello" as const), id: hex16, pub: bytesN(32), name: fc.string({ maxLength: 64 }), instance: fc.string({ maxLength: 20 }), meta, mac: bytesN(32), sig: bytesN(64) }),
  fc.record({ t: fc.constant("signal" as const), to: hex16, data: signalData }),
  fc.record({ t: fc.constant("relay" as const), to: hex16, data: fc.uint8Array({ maxLength: 2000 }) }),
);
const controlMsg: fc.Arbitrary<ControlMsg> = fc.oneof(
  fc.record({ t: fc.constant("hello" as const), name: fc.string({ maxLength: 64 }), instance: fc.string({ maxLength: 20 }), version: fc.string({ maxLength: 10 }), startedAt: fc.nat() }),
  fc.record({ t: fc.constantFrom("ping" as const, "pong" as const), seq: fc.nat(), ts: fc.nat() }),
  fc.record({ t: fc.constant("bye" as const), reason: fc.string({ maxLength: 50 }) }),
  // msgpackr renames a "__proto__" key to "__proto_" on decode (its prototype-pollution guard), so bodies
  // with that key do not round-trip by design (fast-check found one: seed -670599048)
  fc.record({ t: fc.constant("app" as const), ch: fc.string({ minLength: 1, maxLength: 10 }), body: fc.jsonValue().filter((v) => !JSON.stringify(v).includes('"__proto__"')) }),
);

const norm = (x: unknown): unknown =>
  Object.is(x, -0) ? 0 : x instanceof Uint8Array ? [...x] : Array.isArray(x) ? x.map(norm) : x && typeof x === "object" ? Object.fromEntries(Object.entries(x).filter(([, v]) => v !== undefined).map(([k, v]) => [k, norm(v)])) : x;

describe("wire codecs", () => {
  it("server messages round-trip", () => fc.assert(fc.property(serverMsg, (m) => {
    expect(norm(decodeServerMsg(encodeSignal(m)))).toEqual(norm(m));
  })));
  it("client messages round-trip", () => fc.assert(fc.property(clientMsg, (m) => {
    expect(norm(decodeClientMsg(encodeSignal(m)))).toEqual(norm(m));
  })));
  it("control messages round-trip", () => fc.assert(fc.property(controlMsg, (m) => {
    expect(norm(decodeControl(encodeControl(m)))).toEqual(norm(m));
  })));

  it("random bytes never throw anything but ProtocolError", () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 200 }), (b) => {
        for (const dec of [decodeClientMsg, decodeServerMsg, decodeControl]) {
          try {
            dec(b);
          } catch (e) {
            expect(e).toBeInstanceOf(ProtocolError);
          }
        }
      }),
      { numRuns: 500 },
    );
  });

  it("well-formed envelopes with wrong fields are rejected with ProtocolError", () => {
    fc.assert(
      fc.property(fc.constantFrom("hello", "signal", "ping", "welcome", "join", "app", "bye"), fc.dictionary(fc.string({ maxLength: 8 }), fc.jsonValue(), { maxKeys: 5 }), (t, extra) => {
        const raw = encodeMessage({ ...extra, v: 1, t });
        for (const dec of [decodeClientMsg, decodeServerMsg, decodeControl]) {
          try {
            dec(raw);
          } catch (e) {
            expect(e).toBeInstanceOf(ProtocolError);
          }
        }
      }),
    );
  });

  it("rejects oversize, unknown types, newer versions, and ignores unknown fields", () => {
    expect(() => decodeClientMsg(new Uint8Array(MAX_RELAY_BYTES + 1))).toThrow(expect.objectContaining({ code: "ERR_TOO_LARGE" }));
    // a relay frame may be large; any other message above MAX_SIGNAL_BYTES is refused
    const to = "0123456789abcdef";
    expect(decodeClientMsg(encodeSignal({ t: "relay", to, data: new Uint8Array(70_000) })).t).toBe("relay");
    expect(() => decodeClientMsg(encodeSignal({ t: "signal", to, data: { kind: "offer", conn: "c", sdp: "x".repeat(MAX_SIGNAL_BYTES), sig: new Uint8Array(64), mac: new Uint8Array(32) } }))).toThrow(expect.objectContaining({ code: "ERR_TOO_LARGE" }));
    expect(() => decodeControl(new Uint8Array(MAX_CONTROL_BYTES + 1))).toThrow(expect.objectContaining({ code: "ERR_TOO_LARGE" }));
    expect(() => decodeControl(encodeMessage({ v: 1, t: "nope" }))).toThrow(expect.objectContaining({ code: "ERR_UNKNOWN_TYPE" }));
    expect(() => decodeControl(encodeMessage({ v: 99, t: "ping", seq: 1, ts: 1 }))).toThrow(expect.objectContaining({ code: "ERR_VERSION" }));
    expect(decodeControl(encodeMessage({ v: 1, t: "ping", seq: 1, ts: 2, future: "field" }))).toEqual({ t: "ping", seq: 1, ts: 2 });
    expect(() => encodeControl({ t: "app", ch: "x", body: "y".repeat(MAX_CONTROL_BYTES) })).toThrow(ProtocolError);
  });
});
