/** What one IPAM event or call asks the agent to do (see node.ts handle and index.ts). */
import type { WeftError } from "../errors.js";

export interface IpamOutput {
  /** messages for directly connected peers, on the "ipam" app channel (deliver AFTER persisting) */
  send: { to: string; body: unknown }[];
  /** state changed: persist snapshot() atomically before delivering `send` or returning an address */
  persist: boolean;
  /** pod addresses that are no longer ours (the block was reclaimed): tear these pods' interfaces down */
  revoked: { podId: string; ip: string }[];
  /** remote data refused (ProtocolError / IpamError): count them, they were dropped */
  errors: WeftError[];
}

export const emptyOutput = (): IpamOutput => ({ send: [], persist: false, revoked: [], errors: [] });
