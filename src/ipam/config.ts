/** IPAM configuration: what the agent passes in (IpamConfig) and the checked, defaulted form (Resolved). */
import { DEFAULT_CLUSTER_RANGE } from "../defaults.js";
import { NODE_ID_RE } from "../wire/codec.js";
import { type Cidr, blockCount, formatCidr, parseCidr } from "./cidr.js";
import { IpamError } from "./table.js";
import type { IpamKeys } from "./signing.js";
import { MAX_BLOCKS } from "./wire.js";

export interface IpamConfig {
  /** this node's id (16 lowercase hex) */
  id: string;
  /** cluster range this agent was started with (--range); default 10.40.0.0/16 */
  range?: string;
  /** block prefix length (--block-size); default 26 */
  blockPrefix?: number;
  /** R: a member silent (no heartbeat progress) this long is reclaimed; default 10 min */
  reclaimAfterMs?: number;
  /** M: the lease window is R - M; must exceed twice the gossip delay plus clock drift; default R/5 */
  safetyMarginMs?: number;
  /** U: after a restart or after losing the lease, hold majority contact this long before allocating; default 15 s */
  resyncMs?: number;
  /**
   * C: heartbeat timeout: a peer not heard for this long is out of contact for the resync hold (U counts
   * unbroken contact with a majority heard within C); default 5 s, the mesh's own dead-link timeout
   */
  contactMs?: number;
  /** S: a fresh claim is not used for this long, so concurrent heirs converge first; default 10 s */
  claimSettleMs?: number;
  /** a node without state that sees no IPAM waits this long before founding one; default 5 s */
  bootstrapWaitMs?: number;
  /**
   * may this node found a new cluster IPAM? (false = only ever join one); default true. A function is
   * asked at every bootstrap decision: the agent answers from signaling presence ("am I the lowest id of
   * every node I know exists, connected or not?"), so a node that cannot reach anyone yet (UDP blocked,
   * relay still forming) does not found an IPAM of its own next to the real one.
   */
  mayFound?: boolean | (() => boolean);
  /**
   * this node's signing key (signing.ts identityKeys): with keys, every heartbeat, owner write and
   * promise is signed, and unsigned or badly signed remote state is refused (counted as `forged`). The
   * agent always passes its identity; only the pure-algorithm simulations leave it out.
   */
  keys?: IpamKeys;
  /** give up on an unanswered block request after this long; default 5 s */
  requestTimeoutMs?: number;
  /** minimum interval between two full state syncs to one peer on digest mismatch; default 30 s */
  syncIntervalMs?: number;
}

export interface Resolved {
  range: Cidr;
  blockPrefix: number;
  R: number;
  M: number;
  U: number;
  C: number;
  S: number;
  bootstrapWait: number;
  mayFound: boolean | (() => boolean);
  reqTimeout: number;
  syncInterval: number;
}

export function resolve(c: IpamConfig): Resolved {
  if (!NODE_ID_RE.test(c.id)) throw new IpamError("ERR_CONFIG", `node id ${JSON.stringify(c.id)} is not 16 lowercase hex chars`);
  let range: Cidr;
  try {
    range = parseCidr(c.range ?? DEFAULT_CLUSTER_RANGE);
  } catch (e) {
    throw new IpamError("ERR_CONFIG", (e as Error).message);
  }
  const blockPrefix = c.blockPrefix ?? 26;
  if (!Number.isInteger(blockPrefix) || blockPrefix < range.prefix || blockPrefix > 30) throw new IpamError("ERR_CONFIG", `block size /${blockPrefix} must be within /${range.prefix}../30`);
  if (blockCount(range, blockPrefix) > MAX_BLOCKS) throw new IpamError("ERR_CONFIG", `range ${formatCidr(range)} has more than ${MAX_BLOCKS} /${blockPrefix} blocks`);
  if (2 ** (32 - blockPrefix) > 65536) throw new IpamError("ERR_CONFIG", `blocks larger than /16 are not supported`);
  const R = c.reclaimAfterMs ?? 600_000;
  const M = c.safetyMarginMs ?? Math.floor(R / 5);
  const U = c.resyncMs ?? 15_000;
  const S = c.claimSettleMs ?? 10_000;
  if (!(R > 0 && M > 0 && M < R && U >= 0 && S >= 0 && (c.contactMs ?? 5_000) > 0)) throw new IpamError("ERR_CONFIG", "need 0 < safetyMargin < reclaimAfter, resync >= 0, claimSettle >= 0");
  return {
    range,
    blockPrefix,
    R,
    M,
    U,
    C: c.contactMs ?? 5_000,
    S,
    bootstrapWait: c.bootstrapWaitMs ?? 5_000,
    mayFound: c.mayFound ?? true,
    reqTimeout: c.requestTimeoutMs ?? 5_000,
    syncInterval: c.syncIntervalMs ?? 30_000,
  };
}
