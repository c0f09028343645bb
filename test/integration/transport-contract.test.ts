// The transport contract against the real WebRTC transports on loopback: werift, native (libdatachannel),
// and one of each (they interoperate). Their library-specific behaviour is in transport-werift.test.ts and
// transport-native.test.ts.
import { createNativeTransport, nativeAvailable, NATIVE_LIMITS } from "../../agent/transport/native.js";
import { createWeriftTransport, WERIFT_LIMITS } from "../../agent/transport/werift.js";
import { transportContract } from "../helpers/transport-contract.js";

const werift = () => createWeriftTransport({ loopbackOnly: true });
const native = () => createNativeTransport({ loopbackOnly: true });
const hasNative = await nativeAvailable();

transportContract(
  "werift",
  async () => {
    const [ta, tb] = await Promise.all([werift(), werift()]);
    return { ta, tb, close: async () => void (await Promise.all([ta.close(), tb.close()])) };
  },
  { fixedFingerprint: true, maxMessageSize: WERIFT_LIMITS.maxMessageSize, fillable: true, closePropagates: true, remoteCloseMs: 3000 },
);

if (hasNative) {
  transportContract(
    "native",
    async () => {
      const [ta, tb] = await Promise.all([native(), native()]);
      return { ta, tb, close: async () => void (await Promise.all([ta.close(), tb.close()])) };
    },
    { fixedFingerprint: true, maxMessageSize: NATIVE_LIMITS.maxMessageSize, fillable: true, closePropagates: true, remoteCloseMs: 3000 },
  );
  transportContract(
    "native offerer, werift answerer",
    async () => {
      const [ta, tb] = await Promise.all([native(), werift()]);
      return { ta, tb, close: async () => void (await Promise.all([ta.close(), tb.close()])) };
    },
    { fixedFingerprint: true, maxMessageSize: Math.min(NATIVE_LIMITS.maxMessageSize, WERIFT_LIMITS.maxMessageSize), fillable: true, closePropagates: true, remoteCloseMs: 3000 },
  );
}
