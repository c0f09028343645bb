import { describe, expect, it } from "vitest";
import { isTurnUrl, turnIceServers, turnRestCredential, turnRestExpiry, turnRestPassword } from "../../src/wire/turn-rest.js";

describe("TURN REST credentials (coturn use-auth-secret)", () => {
  // Vector computed independently: printf '%s' '1700000000:0123456789abcdef' | openssl dgst -sha1 -hmac north -binary | base64
  it("matches an independently computed HMAC-SHA1 vector", () => {
    expect(turnRestPassword("north", "1700000000:0123456789abcdef")).toBe("UY+gV9nPxo/XYynt7w3HOjqueE4=");
    // and python: base64(hmac.new(b'secret', b'1433895918:alice', sha1).digest())
    expect(turnRestPassword("secret", "1433895918:alice")).toBe("9FlGeCxuzk5viW4BIqwHUUUEvWw=");
  });

  it("builds username <expiry>:<nodeId> with expiry = now + ttl (whole seconds)", () => {
    const c = turnRestCredential("north", "0123456789abcdef", 1_699_999_000_999, 1000);
    expect(c.username).toBe("1700000000:0123456789abcdef");
    expect(c.expires).toBe(1_700_000_000);
    expect(c.credential).toBe("UY+gV9nPxo/XYynt7w3HOjqueE4=");
    expect(turnRestExpiry(c.username)).toBe(1_700_000_000);
    expect(turnRestExpiry("alice")).toBeUndefined();
  });

  it("hands one iceServers entry with all URLs, none without URLs", () => {
    expect(turnIceServers([], "s", "0123456789abcdef", 0)).toEqual([]);
    const one = turnIceServers(["turn:198.18.0.1:3478"], "north", "0123456789abcdef", 1_699_999_000_000, 1000);
    expect(one).toEqual([{ urls: "turn:198.18.0.1:3478", username: "1700000000:0123456789abcdef", credential: "UY+gV9nPxo/XYynt7w3HOjqueE4=" }]);
    const two = turnIceServers(["turn:a:3478", "turn:a:3478?transport=tcp"], "north", "0123456789abcdef", 0);
    expect(two[0]!.urls).toEqual(["turn:a:3478", "turn:a:3478?transport=tcp"]);
  });

  it("rejects empty secrets, odd users and bad ttls", () => {
    expect(() => turnRestCredential("", "n", 0)).toThrow(/secret/);
    expect(() => turnRestCredential("s", "a:b", 0)).toThrow(/user/);
    expect(() => turnRestCredential("s", "n", 0, 0)).toThrow(/ttl/);
  });

  it("validates turn URLs", () => {
    expect(isTurnUrl("turn:198.18.0.1:3478")).toBe(true);
    expect(isTurnUrl("turns:turn.example.org:5349?transport=tcp")).toBe(true);
    expect(isTurnUrl("turn:[fd00::1]:3478")).toBe(true);
    expect(isTurnUrl("stun:198.18.0.1:3478")).toBe(false);
    expect(isTurnUrl("turn:u:p@host:3478")).toBe(false);
  });
});

import { decodeServerMsg, encodeSignal } from "../../src/wire/signal.js";

describe("welcome carries optional TURN credentials and a second STUN port", () => {
  const base = { t: "welcome" as const, you: { id: "0123456789abcdef", addr: "198.18.0.10:4000" }, peers: [], stunPort: 3478 };

  it("round-trips iceServers and stunAltPort", () => {
    const ice = turnIceServers(["turn:198.18.0.1:3478"], "north", "0123456789abcdef", 0, 60);
    const m = decodeServerMsg(encodeSignal({ ...base, stunAltPort: 3479, iceServers: ice }));
    expect(m).toEqual({ ...base, stunAltPort: 3479, iceServers: ice });
  });

  it("decodes a welcome without them as before (fields absent)", () => {
    const m = decodeServerMsg(encodeSignal(base));
    expect(m).toEqual(base);
    expect("iceServers" in m).toBe(false);
  });

  it("rejects malformed iceServers", () => {
    expect(() => decodeServerMsg(encodeSignal({ ...base, iceServers: [{ urls: 5 }] } as never))).toThrow();
    expect(() => decodeServerMsg(encodeSignal({ ...base, iceServers: ["turn:x"] } as never))).toThrow();
  });
});
