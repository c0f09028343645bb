// The transport contract against the in-memory transport and the relay transport (two relay transports
// whose ports hand frames to each other, as the signaling server would). No sockets, no root.
import { createRelayTransport, RELAY_MAX_MESSAGE, type RelayPort, type RelayTransport } from "../../agent/transport/relay.js";
import { MemoryNetwork } from "../../src/testing/memory-transport.js";
import { transportContract } from "../helpers/transport-contract.js";

transportContract(
  "memory",
  async () => {
    const net = new MemoryNetwork({ bufferLimit: 64 * 1024 });
    return { ta: net.transport(), tb: net.transport(), close: async () => {} };
  },
  { fixedFingerprint: true, maxMessageSize: 1024 * 1024, fillable: true, closePropagates: true, remoteCloseMs: 1000 },
);

transportContract(
  "relay",
  async () => {
    const A = "aaaaaaaaaaaaaaaa";
    const B = "bbbbbbbbbbbbbbbb";
    const t: Record<string, RelayTransport> = {};
    const port = (self: string): RelayPort => ({
      up: true,
      sendRelay(to, data) {
        const copy = new Uint8Array(data);
        setImmediate(() => t[to]?.deliver(self, copy)); // the server forwards asynchronously
        return true;
      },
      bufferedAmount: () => 0,
    });
    t[A] = createRelayTransport({ selfId: A, token: "peer-key", port: port(A) });
    t[B] = createRelayTransport({ selfId: B, token: "peer-key", port: port(B) });
    return {
      ta: t[A]!,
      tb: t[B]!,
      ids: [A, B],
      close: async () => {
        await t[A]!.close();
        await t[B]!.close();
      },
    };
  },
  { fixedFingerprint: false, maxMessageSize: RELAY_MAX_MESSAGE, fillable: false, closePropagates: false, remoteCloseMs: 1000 },
);
