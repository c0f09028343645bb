/**
 * The operator credential (issue 12): `weftnet keygen --operator` makes an Ed25519 pair that no node holds;
 * agents run with its public key (--operator-key), and `weftnet ipam release NODE --operator-key-file F`
 * signs the release of each of NODE's blocks and NODE's removal from the IPAM member list with the private
 * key. Every agent checks those signatures
 * before it merges or forwards the forced entries (src/ipam/node.ts checkWrite), so a compromised node
 * with the cluster token cannot release another node's addresses.
 */
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { UsageError, WeftError } from "../../src/errors.js";
import { generateIdentity, identityFromPem, identityToPem, parseOperatorKey, publicKeyHex, signFields } from "../../src/identity.js";
import { CTX_RELEASE, CTX_REMOVE, releaseFields, removeFields } from "../../src/ipam/signing.js";
import { apiRequest } from "../api-client.js";
import { parse } from "./util.js";

export const KEYGEN_HELP = `Usage: weftnet keygen --operator --out FILE

Make the operator key pair: FILE (the private key, PEM, mode 0600: keep it off the nodes) and FILE.pub
(the public key, 64 hex characters, also printed). Run every agent with --operator-key FILE.pub (or the
hex key); \`weftnet ipam release NODE --operator-key-file FILE\` then signs a release that every agent
checks. Without an operator key, another node's blocks are released only when an agent sees its
Kubernetes Node deleted itself (--k8s-node-watch), or by the node itself (it hands them on as it leaves).
`;

export function runKeygen(argv: string[]): number {
  const { values } = parse("keygen", argv, { operator: { type: "boolean" }, out: { type: "string" }, help: { type: "boolean", short: "h" } });
  if (values.help) {
    process.stdout.write(KEYGEN_HELP);
    return 0;
  }
  if (!values.operator) throw new UsageError("weftnet keygen: only --operator keys are made here (node keys are made by the agent in its state dir)");
  const out = values.out;
  if (!out) throw new UsageError("weftnet keygen: give --out FILE (the private key is written there, mode 0600, never printed)");
  if (existsSync(out) || existsSync(`${out}.pub`)) throw new UsageError(`weftnet keygen: ${out} or ${out}.pub exists; refusing to overwrite a key`);
  const idn = generateIdentity();
  writeFileSync(out, identityToPem(idn), { mode: 0o600, flag: "wx" });
  const pub = publicKeyHex(idn);
  writeFileSync(`${out}.pub`, `${pub}\n`, { mode: 0o644, flag: "wx" });
  process.stdout.write(`${pub}\n`);
  return 0;
}

/** --operator-key: the hex public key itself, or a file holding it (FILE.pub of `weftnet keygen --operator`). */
export function loadOperatorKey(value: string): Uint8Array {
  const v = value.trim();
  if (/^[0-9a-fA-F]{64}$/.test(v)) return parseOperatorKey(v);
  let text: string;
  try {
    text = readFileSync(v, "utf8");
  } catch (e) {
    throw new UsageError(`weftnet agent: --operator-key ${JSON.stringify(value)} is neither 64 hex characters nor a readable file: ${(e as Error).message}`);
  }
  try {
    return parseOperatorKey(text);
  } catch {
    throw new UsageError(`weftnet agent: --operator-key file ${v} does not hold an operator public key (64 hex characters; give the .pub file, not the private key)`);
  }
}

type IpamBlocks = {
  id: string;
  epoch: { id: string } | null;
  blocks: { index: number; owner: string; ownerName?: string | null; version: number }[];
  members?: { id: string }[];
};

/**
 * Sign the release of every block `target` (id, unique name or id prefix; a block owner or a member that
 * owns no block) owns in the agent's current view — [[block, hex signature]] — and its removal from the
 * member list (`remove`, hex signature; so that one command also removes a dead member without blocks),
 * for POST /v1/ipam/release-node, with the node id.
 */
export async function signRelease(sock: string, target: string, keyFile: string): Promise<{ node: string; sigs: [number, string][]; remove: string }> {
  let pem: string;
  try {
    pem = readFileSync(keyFile, "utf8");
  } catch (e) {
    throw new UsageError(`weftnet ipam: cannot read the operator key ${keyFile}: ${(e as Error).message}`);
  }
  const op = identityFromPem(pem);
  const view = await apiRequest<IpamBlocks>(sock, "GET", "/v1/ipam");
  if (!view.epoch) throw new WeftError("ERR_NOT_READY", "the agent has no cluster IPAM yet");
  const owners = [...new Set([...view.blocks.map((b) => b.owner), ...(view.members ?? []).map((m) => m.id)])].filter((o) => o !== view.id);
  const names = new Map(view.blocks.map((b) => [b.owner, b.ownerName ?? null]));
  let id = owners.find((o) => o === target);
  if (!id) {
    const byName = owners.filter((o) => names.get(o) === target);
    const byPrefix = owners.filter((o) => o.startsWith(target));
    id = byName.length === 1 ? byName[0] : byName.length === 0 && byPrefix.length === 1 ? byPrefix[0] : undefined;
  }
  if (!id) throw new WeftError("ERR_NO_PEER", `no IPAM member matches ${JSON.stringify(target)}; give the full node id from \`weftnet status ipam\``);
  const epoch = view.epoch.id;
  // each signature names this agent as the new owner: no other node can copy it onto a release of its own
  const sigs = view.blocks.filter((b) => b.owner === id).map((b) => [b.index, Buffer.from(signFields(op, CTX_RELEASE, ...releaseFields(epoch, b.index, id!, b.version + 1, view.id))).toString("hex")] as [number, string]);
  const remove = Buffer.from(signFields(op, CTX_REMOVE, ...removeFields(epoch, id))).toString("hex");
  return { node: id, sigs, remove };
}
