/**
 * Test helpers for transport links (any Transport: werift, native, or one of each): two links wired by
 * passing their signals directly (no signaling server, no mocks), with everything they report recorded.
 */
import { expect } from "vitest";
import { AFTER_ICE_CONNECTED, type ChannelName, type LinkOptions, type LinkSignal, type Transport, type TransportLink } from "../../src/mesh/transport.js";
import { createLogger, type Logger } from "../../src/log.js";

/** A logger at info level whose lines are kept, to assert on what a link logs. */
export function capturedLogger(): { logger: Logger; logLines: string[] } {
  const logLines: string[] = [];
  return { logger: createLogger({ level: "info", sink: (l) => logLines.push(l) }), logLines };
}

/** One link and everything its handlers saw. `onMessage`/`onDrain`: extra per-test reactions. */
export interface Side {
  link: TransportLink;
  signals: LinkSignal[];
  messages: { channel: ChannelName; data: Uint8Array }[];
  closes: string[];
  drains: ChannelName[];
  opened: Promise<void>;
  closed: Promise<string>;
  onMessage?: (channel: ChannelName, data: Uint8Array) => void;
  onDrain?: (channel: ChannelName) => void;
}

/**
 * Create a link on `t` that records what it reports and hands each of its signals to `deliver`. `addr`: the
 * remote node and connection id, for transports that address peers themselves (relay); `iceServers`: STUN/TURN.
 */
export function makeSide(t: Transport, initiator: boolean, deliver: (sig: LinkSignal) => void, addr?: { peer: string; conn: string }, iceServers: LinkOptions["iceServers"] = []): Side {
  let opened!: () => void;
  let closed!: (r: string) => void;
  const side: Side = {
    link: undefined as unknown as TransportLink,
    signals: [],
    messages: [],
    closes: [],
    drains: [],
    opened: new Promise<void>((r) => (opened = r)),
    closed: new Promise<string>((r) => (closed = r)),
  };
  side.link = t.createLink({
    initiator,
    ...(addr ?? {}),
    iceServers,
    handlers: {
      onSignal: (sig) => {
        side.signals.push(sig);
        deliver(sig);
      },
      onOpen: () => opened(),
      onMessage: (channel, data) => {
        side.messages.push({ channel, data });
        side.onMessage?.(channel, data);
      },
      onClose: (reason) => {
        side.closes.push(reason);
        closed(reason);
      },
      onDrain: (channel) => {
        side.drains.push(channel);
        side.onDrain?.(channel);
      },
    },
  });
  return side;
}

export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** `p`, or a rejection "timeout: <what>" after `ms`. */
export function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([
    p.finally(() => clearTimeout(timer)),
    new Promise<T>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`timeout: ${what}`)), ms);
    }),
  ]);
}

/** Poll `cond` every 5 ms until it holds; rejects after `ms`. */
export async function until(cond: () => boolean, ms: number, what: string): Promise<void> {
  await within(
    (async () => {
      while (!cond()) await sleep(5);
    })(),
    ms,
    what,
  );
}

export interface Pair {
  a: Side;
  b: Side;
  /** Candidates the answerer was handed before its offer (shuffle mode). */
  candidatesBeforeOffer: number;
}

/**
 * Connect two links directly (a = initiator on ta) and wait until both are open. `shuffle`: hold each side's
 * candidates until its description is emitted, then hand them over shuffled BEFORE the description, which
 * follows 50 ms later; candidates produced after that are handed over at once, also before the delayed
 * description.
 *
 * A link closed before it opened fails the pair at once, with its reason. One exception, as in the mesh
 * (src/mesh/manager.ts RELAY_AFTER_DTLS_FAILURES): an attempt that failed after ICE connected (werift's
 * DTLS handshake fails now and then when the box is loaded: a duplicate HelloVerifyRequest after a late
 * answer) is made again with fresh links, at most MAX_DTLS_ATTEMPTS in all, and said on stderr.
 */
let pairSeq = 0;
const MAX_DTLS_ATTEMPTS = 3;
export async function connectPair(ta: Transport, tb: Transport, shuffle = false, ids?: [string, string]): Promise<Pair> {
  for (let attempt = 1; ; attempt++) {
    const pair = startPair(ta, tb, shuffle, ids);
    await pair.a.link.start();
    const closedEarly = Promise.race([pair.a.closed.then((r) => `offerer: ${r}`), pair.b.closed.then((r) => `answerer: ${r}`)]);
    const failure = await within(Promise.race([Promise.all([pair.a.opened, pair.b.opened]).then(() => undefined), closedEarly]), 20_000, "links open");
    if (failure === undefined) return pair;
    pair.a.link.close();
    pair.b.link.close();
    if (!failure.includes(AFTER_ICE_CONNECTED) || attempt >= MAX_DTLS_ATTEMPTS) throw new Error(`link closed before it opened (attempt ${attempt}): ${failure}`);
    console.warn(`connectPair: attempt ${attempt} failed after ICE connected (${failure}); trying again with fresh links, as the mesh does`);
  }
}

function startPair(ta: Transport, tb: Transport, shuffle: boolean, ids?: [string, string]): Pair {
  let a!: Side;
  let b!: Side;
  const pair = { candidatesBeforeOffer: 0 } as Pair;
  let bHasOffer = false;
  const fwd = (target: () => Side, toAnswerer: boolean) => {
    const held: LinkSignal[] = [];
    let descSent = false;
    const hand = (sig: LinkSignal) => {
      if (toAnswerer && sig.kind === "candidate" && !bHasOffer) pair.candidatesBeforeOffer++;
      if (toAnswerer && sig.kind === "offer") bHasOffer = true;
      void target().link.handleSignal(sig);
    };
    return (sig: LinkSignal) => {
      if (!shuffle) return hand(sig);
      if (sig.kind === "candidate") {
        if (descSent) hand(sig);
        else held.push(sig);
        return;
      }
      descSent = true;
      for (const c of held.splice(0).sort(() => Math.random() - 0.5)) hand(c);
      setTimeout(() => hand(sig), 50);
    };
  };
  const conn = `pair-${++pairSeq}`;
  a = makeSide(ta, true, fwd(() => b, true), ids && { peer: ids[1], conn });
  b = makeSide(tb, false, fwd(() => a, false), ids && { peer: ids[0], conn });
  pair.a = a;
  pair.b = b;
  return pair;
}

/** Each side sends one message on each channel; each must arrive once, intact, as a Uint8Array. */
export async function exchangeBothChannels(a: Side, b: Side): Promise<void> {
  expect(a.link.send("control", new Uint8Array([1, 2, 3]))).toBe("ok");
  expect(a.link.send("packets", new Uint8Array([4, 5]))).toBe("ok");
  expect(b.link.send("control", new Uint8Array([6]))).toBe("ok");
  expect(b.link.send("packets", new Uint8Array([7, 8, 9, 10]))).toBe("ok");
  await until(() => a.messages.length >= 2 && b.messages.length >= 2, 5000, "messages");
  const got = (s: Side, ch: ChannelName) => s.messages.filter((m) => m.channel === ch).map((m) => [...m.data]);
  expect(got(b, "control")).toEqual([[1, 2, 3]]);
  expect(got(b, "packets")).toEqual([[4, 5]]);
  expect(got(a, "control")).toEqual([[6]]);
  expect(got(a, "packets")).toEqual([[7, 8, 9, 10]]);
  for (const m of [...a.messages, ...b.messages]) expect(m.data).toBeInstanceOf(Uint8Array);
}
