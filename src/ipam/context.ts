/**
 * The parts of an IPAM node that its modules (gossip.ts, grants.ts, pins.ts) all read. node.ts builds one
 * such view and spreads it into each module's context beside what only that module needs. epoch() and
 * table() are read at each use: both are replaced when the node joins a cluster or adopts a snapshot.
 */
import type { SignedState } from "./certs.js";
import type { Resolved } from "./config.js";
import type { WriteRule } from "./consensus.js";
import type { Lease } from "./lease.js";
import type { PeerInfo } from "./status.js";
import type { BlockTable } from "./table.js";
import type { EpochInfo } from "./wire.js";

export interface NodeParts {
  readonly cfg: Resolved;
  readonly lease: Lease;
  readonly rule: WriteRule;
  readonly signed: SignedState | null;
  readonly peers: ReadonlySet<string>;
  readonly info: ReadonlyMap<string, PeerInfo>;
  epoch(): EpochInfo | null;
  table(): BlockTable | null;
}
