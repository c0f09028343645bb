/**
 * weftnet IPAM core (sans-I/O). How to drive it from the agent:
 *
 *   const ipam = snap ? IpamNode.restore(snap, cfg, Date.now()) : new IpamNode(cfg, Date.now());
 *   mesh.onPeerUp((id) => apply(ipam.handle({ type: "peerUp", peer: id }, Date.now())));
 *   mesh.onPeerDown((id) => apply(ipam.handle({ type: "peerDown", peer: id }, Date.now())));
 *   mesh.onApp("ipam", (from, body) => apply(ipam.handle({ type: "message", from, body }, Date.now())));
 *   setInterval(() => apply(ipam.handle({ type: "tick" }, Date.now())), 1000);   // heartbeat + timers
 *
 *   function apply(out: IpamOutput) {
 *     if (out.persist) writeAtomically(stateDir, ipam.snapshot());   // FIRST persist (tmp + rename) ...
 *     for (const { to, body } of out.send) mesh.sendApp(to, "ipam", body); // ... THEN send
 *     for (const r of out.revoked) tearDownPod(r.podId, r.ip);           // block reclaimed while we were away
 *     for (const e of out.errors) count(e.code);                         // remote data refused, already dropped
 *   }
 *
 *   CNI ADD:  const r = ipam.allocate(podId, Date.now()); apply(r.output);
 *             if (r.ok) { if (r.changed) persist first; return r.ip } else retry later (r.error.code:
 *             ERR_NOT_READY = frozen/resyncing/no cluster, ERR_EXHAUSTED = block requested, retry soon)
 *   CNI DEL:  const r = ipam.release(podId); if (r.changed) persist.
 *   Operator: ipam.forceRelease(node, now)  (`weftnet ipam release NODE`);  ipam.leave(now) on uninstall.
 *   Status:   ipam.status(now)  (JSON-able: range, blocks [{cidr, owner, free}], allocations, pending, ...)
 *   Owners:   ipam.owners()     (range + (cidr, owner) of every block; the same object until an owner changes:
 *             for hot readers like route policy, instead of the full status)
 *
 * `now` must come from one clock per process (wall or monotonic); only its rate matters across nodes.
 * Every call is synchronous and never awaits. docs/ipam.md has the algorithm and safety argument.
 */
export * from "./cidr.js";
export { OwnersCache, type IpamOwners } from "./owners.js";
export { BlockTable, IpamError, compareEntries, type Entry, type EntryKind, type EntryTuple, type IpamErrorCode } from "./table.js";
export { decodeIpamMessage, encodeIpamMessage, epochId, type EpochInfo, type IpamMessage, IPAM_WIRE_VERSION, MAX_BLOCKS, STATE_CHUNK } from "./wire.js";
export { identityKeys, type IpamKeys } from "./signing.js";
export { IpamNode, MAX_BEAT_AHEAD_MS, MAX_VERSION_STEP, type AllocateResult, type IpamConfig, type IpamCounters, type IpamEvent, type IpamOutput, type IpamSnapshot, type IpamStatus } from "./node.js";
