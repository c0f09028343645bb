/**
 * The live topology page (browser side). See agent/ui/viewer.ts for the protocol: this tab gets its own
 * Ed25519 key (WebCrypto), proves the cluster credential to each agent (HMAC with the peer key derived
 * from the pasted token; the token itself never leaves the tab) or shows an invite the signaling server
 * signed, opens one WebRTC link per agent — the first over HTTP to the server that served the page (an
 * agent's --ui-listen answers itself; `weftnet signal` hands the offer to one agent, after checking a
 * join-key proof or its own invite), the others introduced through an open link — and renders what the
 * agents report, plus its own RTT to each of them.
 */

type Json = Record<string, unknown>;

interface PeerInfo {
  id: string;
  name: string;
  state: string;
  path: string;
  linkType: string | null;
  linkWhy: string;
  lastWebrtcError: string | null;
  lastError: string | null;
  rttMs: number | null;
  bytesIn: number;
  bytesOut: number;
  pathMtu: number | null;
  /** how pathMtu was found (confirmed, route-limit, black-hole, peer, default, fixed, searching) */
  pmtuHow?: string | null;
  selected: { localType: string; remoteType: string; remoteAddress: string } | null;
}

interface State {
  at: number;
  node: { id: string; name: string; transport: string; signal: { url: string; connected: boolean } };
  peers: PeerInfo[];
  routes: { dst: string; name: string; via: string; costMs: number; path: string[] }[];
  ipam: { range: string; owners: { id: string; name: string | null; blocks: number; cidrs: string[] }[]; pods: number };
}

interface AgentConn {
  id: string;
  name: string;
  pc: RTCPeerConnection;
  control: RTCDataChannel;
  authed: boolean;
  state: State | null;
  prev: State | null;
  rttMs: number | null;
  pongs: number;
  pending: Map<number, (m: Json) => void>;
  lastPongAt: number;
}

const $ = <T extends HTMLElement>(sel: string) => document.querySelector(sel) as T;
const enc = new TextEncoder();
const dec = new TextDecoder();
const CTX = "weftnet/viewer-auth/v1";

const conns = new Map<string, AgentConn>();
const connecting = new Set<string>();
let identity: { id: string; pubHex: string; priv: CryptoKey } | null = null;
let macKey: CryptoKey | null = null;
/** HMAC key of the join key (what the signaling server holds): proves the token to the server's /ui/v1/offer */
let joinMacKey: CryptoKey | null = null;
let invite: string | null = null;
const OFFER_CTX = "weftnet/viewer-offer/v1";
let seq = 0;
let refused = false;

const hex = (b: ArrayBuffer | Uint8Array) => [...new Uint8Array(b)].map((x) => x.toString(16).padStart(2, "0")).join("");

/** frame(context, ...fields) of src/identity.ts: context, then per field a 4-byte big-endian length and the bytes. */
function frame(context: string, ...fields: string[]): Uint8Array<ArrayBuffer> {
  const parts: Uint8Array[] = [enc.encode(context)];
  for (const f of fields) {
    const b = enc.encode(f);
    const len = new Uint8Array(4);
    new DataView(len.buffer).setUint32(0, b.length);
    parts.push(len, b);
  }
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

function setStatus(text: string, cls: "" | "ok" | "bad" = ""): void {
  const s = $("#status");
  s.textContent = text;
  s.className = cls;
}

async function makeIdentity(credential: string): Promise<void> {
  const kp = (await crypto.subtle.generateKey({ name: "Ed25519" }, false, ["sign", "verify"])) as CryptoKeyPair;
  const pub = new Uint8Array(await crypto.subtle.exportKey("raw", kp.publicKey));
  const id = hex(await crypto.subtle.digest("SHA-256", pub)).slice(0, 16);
  identity = { id, pubHex: hex(pub), priv: kp.privateKey };
  macKey = joinMacKey = invite = null;
  if (credential.startsWith("wv1.")) {
    invite = credential; // a viewer invite (src/wire/invite.ts): shown to the server and to each agent
    return;
  }
  // HKDF-SHA256(token, salt "weftnet/token-split/v1", info) as hex (src/identity.ts splitToken): "peer" is
  // the agents' own secret, which the signaling server never has; "join" is what the server holds
  const ikm = await crypto.subtle.importKey("raw", enc.encode(credential), "HKDF", false, ["deriveBits"]);
  const derive = async (info: string) => {
    const bits = await crypto.subtle.deriveBits({ name: "HKDF", hash: "SHA-256", salt: enc.encode("weftnet/token-split/v1"), info: enc.encode(info) }, ikm, 256);
    return crypto.subtle.importKey("raw", enc.encode(hex(bits)), { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
  };
  macKey = await derive("peer");
  joinMacKey = await derive("join");
}

function send(c: { control: RTCDataChannel }, m: Json): void {
  if (c.control.readyState === "open") c.control.send(enc.encode(JSON.stringify(m)));
}

function request(c: AgentConn, m: Json, timeoutMs = 10_000): Promise<Json> {
  const s = ++seq;
  return new Promise((resolve) => {
    const timer = setTimeout(() => {
      c.pending.delete(s);
      resolve({ t: "error", error: "timeout" });
    }, timeoutMs);
    c.pending.set(s, (r) => {
      clearTimeout(timer);
      resolve(r);
    });
    send(c, { ...m, seq: s });
  });
}

/** A new peer connection with the two pre-negotiated channels the agents' transports expect, and its offer. */
async function newPc(): Promise<{ pc: RTCPeerConnection; control: RTCDataChannel; sdp: string }> {
  const pc = new RTCPeerConnection({ iceServers: [] });
  const control = pc.createDataChannel("control", { negotiated: true, id: 0, ordered: true });
  const packets = pc.createDataChannel("packets", { negotiated: true, id: 1, ordered: false, maxRetransmits: 0 });
  packets.binaryType = "arraybuffer";
  // The only thing a viewer does on `packets`: answer the agents' path MTU probes (agent/transport/link-base.ts:
  // 0xf0 0x01 nonce[8] ... -> 0xf0 0x02 nonce[8]). Pod traffic never comes here, and none is sent.
  packets.onmessage = (ev) => {
    const b = new Uint8Array(ev.data as ArrayBuffer);
    if (b.length >= 10 && b[0] === 0xf0 && b[1] === 1) {
      const ack = new Uint8Array(10);
      ack[0] = 0xf0;
      ack[1] = 2;
      ack.set(b.subarray(2, 10), 2);
      packets.send(ack);
    }
  };
  control.binaryType = "arraybuffer";
  await pc.setLocalDescription(await pc.createOffer());
  // Non-trickle: the offer carries every candidate (the introduction is one request / one message).
  await new Promise<void>((resolve) => {
    if (pc.iceGatheringState === "complete") return resolve();
    const t = setTimeout(resolve, 2000);
    pc.addEventListener("icegatheringstatechange", () => {
      if (pc.iceGatheringState === "complete") {
        clearTimeout(t);
        resolve();
      }
    });
  });
  return { pc, control, sdp: pc.localDescription!.sdp };
}

async function finishPc(pc: RTCPeerConnection, answer: { sdp: string; candidates: RTCIceCandidateInit[] }): Promise<void> {
  await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
  for (const c of answer.candidates ?? []) await pc.addIceCandidate(c).catch(() => {});
}

function attach(pc: RTCPeerConnection, control: RTCDataChannel, expectId: string | null): void {
  const c: AgentConn = { id: expectId ?? "", name: "", pc, control, authed: false, state: null, prev: null, rttMs: null, pongs: 0, pending: new Map(), lastPongAt: 0 };
  control.onmessage = async (ev) => {
    const m = JSON.parse(dec.decode(ev.data as ArrayBuffer)) as Json;
    switch (m.t) {
      case "challenge": {
        const node = m.node as { id: string; name: string };
        c.id = node.id;
        c.name = node.name;
        const nonce = String(m.nonce);
        const sig = await crypto.subtle.sign("Ed25519", identity!.priv, frame(CTX, nonce, node.id));
        if (invite !== null) {
          send(c, { t: "auth", id: identity!.id, pub: identity!.pubHex, sig: hex(sig), invite });
          break;
        }
        const mac = await crypto.subtle.sign("HMAC", macKey!, frame(CTX, nonce, node.id, identity!.id, identity!.pubHex));
        send(c, { t: "auth", id: identity!.id, pub: identity!.pubHex, sig: hex(sig), mac: hex(mac) });
        break;
      }
      case "welcome":
        c.authed = true;
        conns.set(c.id, c);
        connecting.delete(c.id);
        if (!refused) setStatus(`joined: ${conns.size} agent link(s), viewer id ${identity!.id}`, "ok");
        break;
      case "refused":
        refused = true;
        setStatus(`refused by ${c.name || "the agent"}: ${String(m.reason)}`, "bad");
        pc.close();
        break;
      case "state":
        c.prev = c.state;
        c.state = m as unknown as State;
        void discover(c);
        render();
        break;
      case "pong":
        c.rttMs = performance.now() - Number(m.ts);
        c.pongs++;
        c.lastPongAt = Date.now();
        render();
        break;
      default: {
        const f = c.pending.get(Number(m.seq));
        if (f) {
          c.pending.delete(Number(m.seq));
          f(m);
        }
      }
    }
  };
  const gone = () => {
    if (conns.get(c.id) === c) conns.delete(c.id);
    connecting.delete(c.id);
    render();
  };
  control.onclose = gone;
  pc.addEventListener("connectionstatechange", () => {
    if (pc.connectionState === "failed" || pc.connectionState === "closed") gone();
  });
}

/** Open links to every agent an open link knows about, introduced through that link. */
async function discover(via: AgentConn): Promise<void> {
  for (const p of via.state?.peers ?? []) {
    if (p.state !== "connected" || conns.has(p.id) || connecting.has(p.id) || refused) continue;
    connecting.add(p.id);
    try {
      const { pc, control, sdp } = await newPc();
      attach(pc, control, p.id);
      const r = await request(via, { t: "connect", target: p.id, sdp });
      if (r.t !== "answer") throw new Error(String(r.error ?? "no answer"));
      await finishPc(pc, r as unknown as { sdp: string; candidates: RTCIceCandidateInit[] });
      setTimeout(() => {
        if (!conns.has(p.id)) connecting.delete(p.id); // retry on a later state if it did not open
      }, 15_000);
    } catch (e) {
      console.warn(`cannot open a link to ${p.name} through ${via.name}: ${(e as Error).message}`);
      connecting.delete(p.id);
    }
  }
}

/** The first link, through the server that served the page; tried again (up to 3 times) when it does not open. */
const FIRST_LINK_MS = 15_000;
let joinRun = 0;

async function join(ev: Event): Promise<void> {
  ev.preventDefault();
  const token = $<HTMLInputElement>("#credential").value.trim();
  if (!token) return setStatus("paste the cluster token (or an invite) first", "bad");
  const run = ++joinRun;
  refused = false;
  for (const c of conns.values()) c.pc.close();
  conns.clear();
  setStatus("joining…");
  try {
    await makeIdentity(token);
  } catch (e) {
    return setStatus(`cannot join: ${(e as Error).message}`, "bad");
  }
  for (let attempt = 1; attempt <= 3 && run === joinRun && !refused; attempt++) {
    let pc: RTCPeerConnection | undefined;
    try {
      const x = await newPc();
      pc = x.pc;
      attach(x.pc, x.control, null);
      // The credential for the server that answers this request: an agent's page ignores it (the agent checks
      // the credential on the link), `weftnet signal` wants a join-key proof bound to this offer, or its invite.
      let cred: Json;
      if (invite !== null) cred = { invite };
      else {
        const ts = Date.now();
        cred = { proof: { ts, mac: hex(await crypto.subtle.sign("HMAC", joinMacKey!, frame(OFFER_CTX, String(ts), x.sdp))) } };
      }
      const res = await fetch("/ui/v1/offer", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ sdp: x.sdp, ...cred }) });
      const body = (await res.json()) as { sdp: string; candidates: RTCIceCandidateInit[]; error?: { code?: string; message: string } };
      if (res.status === 401) {
        refused = true;
        pc.close();
        return setStatus(`refused by the signaling server: ${body.error?.message ?? "wrong credential"}`, "bad");
      }
      if (!res.ok) throw new Error(body.error?.message ?? `HTTP ${res.status}`);
      await finishPc(pc, body);
    } catch (e) {
      setStatus(`cannot join: ${(e as Error).message}`, "bad");
      pc?.close();
      if (attempt === 3) return;
    }
    // joined (a welcome), refused, or give this link up and ask again (maybe another agent answers)
    const until = Date.now() + FIRST_LINK_MS;
    while (Date.now() < until && conns.size === 0 && !refused && run === joinRun) await new Promise((r) => setTimeout(r, 200));
    if (conns.size > 0 || refused || run !== joinRun) return;
    pc?.close();
    console.warn(`the first link did not open within ${FIRST_LINK_MS / 1000} s (attempt ${attempt})`);
    if (attempt < 3) setStatus(`joining… (attempt ${attempt + 1})`);
    else setStatus("cannot join: no link to an agent opened", "bad");
  }
}

// ---- rendering ------------------------------------------------------------------------------------

const fmtRtt = (ms: number | null | undefined) => (ms === null || ms === undefined ? "-" : ms < 1 ? `${ms.toFixed(2)} ms` : ms < 100 ? `${ms.toFixed(1)} ms` : `${Math.round(ms)} ms`);
const fmtRate = (bps: number) => (bps < 1e3 ? `${bps.toFixed(0)} bit/s` : bps < 1e6 ? `${(bps / 1e3).toFixed(1)} kbit/s` : `${(bps / 1e6).toFixed(1)} Mbit/s`);
const esc = (s: string) => s.replace(/[&<>"]/g, (ch) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[ch]!);

interface MeshNode {
  id: string;
  name: string;
  state: State | null;
  conn: AgentConn | undefined;
}

function model(): { nodes: Map<string, MeshNode>; links: Map<string, { a: MeshNode; b: MeshNode; info: PeerInfo; rate: number; from: string }> } {
  const nodes = new Map<string, MeshNode>();
  for (const c of conns.values()) if (c.state) nodes.set(c.id, { id: c.id, name: c.name, state: c.state, conn: c });
  for (const c of conns.values()) for (const p of c.state?.peers ?? []) if (p.state !== "gone" && !nodes.has(p.id)) nodes.set(p.id, { id: p.id, name: p.name, state: null, conn: undefined });
  const links = new Map<string, { a: MeshNode; b: MeshNode; info: PeerInfo; rate: number; from: string }>();
  for (const c of conns.values()) {
    for (const p of c.state?.peers ?? []) {
      if (p.state !== "connected") continue;
      const key = [c.id, p.id].sort().join("-");
      const prev = c.prev?.peers.find((x) => x.id === p.id);
      const dt = c.prev ? (c.state!.at - c.prev.at) / 1000 : 0;
      const rate = prev && dt > 0 ? (Math.max(0, p.bytesOut - prev.bytesOut) + Math.max(0, p.bytesIn - prev.bytesIn)) * 8 / dt : 0;
      // one row per pair: the lower id's view (both ends agree on the path; either one will do)
      if (!links.has(key) || c.id < p.id) links.set(key, { a: nodes.get(c.id)!, b: nodes.get(p.id)!, info: p, rate, from: c.id });
    }
  }
  return { nodes, links };
}

function pathClass(p: PeerInfo): string {
  const t = p.linkType ?? (p.path.startsWith("via") ? "via" : p.path);
  return t === "webrtc" ? "direct" : t;
}

function why(p: PeerInfo): string {
  if (p.path === "relay") return `relayed through the signaling server: ${p.lastWebrtcError ?? "WebRTC did not connect"}`;
  if (p.path.startsWith("via")) return p.linkWhy || `no usable direct link; routed ${p.path} (lowest measured RTT)`;
  if (p.linkWhy) return p.linkWhy;
  return p.selected ? `${p.selected.localType}->${p.selected.remoteType} ${p.selected.remoteAddress}` : "";
}

function render(): void {
  const { nodes, links } = model();
  const list = [...nodes.values()].sort((a, b) => a.name.localeCompare(b.name));
  // graph: nodes on a circle
  const W = 480, H = 400, R = 150;
  const pos = new Map(list.map((n, i) => [n.id, { x: W / 2 + R * Math.cos((2 * Math.PI * i) / Math.max(1, list.length) - Math.PI / 2), y: H / 2 + R * Math.sin((2 * Math.PI * i) / Math.max(1, list.length) - Math.PI / 2) }]));
  let svg = "";
  for (const [key, l] of links) {
    const a = pos.get(l.a.id)!, b = pos.get(l.b.id)!;
    const cls = pathClass(l.info);
    svg += `<line data-link="${key}" class="path-${cls}" x1="${a.x}" y1="${a.y}" x2="${b.x}" y2="${b.y}" stroke-width="3"/>`;
    svg += `<text x="${(a.x + b.x) / 2}" y="${(a.y + b.y) / 2 - 4}" font-size="11" text-anchor="middle" fill="#3c4652">${esc(cls)} ${esc(fmtRtt(l.info.rttMs))}</text>`;
  }
  for (const n of list) {
    const p = pos.get(n.id)!;
    const live = n.conn && Date.now() - n.conn.lastPongAt < 5000;
    svg += `<g data-node="${n.id}"><circle cx="${p.x}" cy="${p.y}" r="22" fill="${live ? "#e6f4ea" : "#fce8e6"}" stroke="#3c4652"/>`;
    svg += `<text x="${p.x}" y="${p.y + 4}" font-size="12" text-anchor="middle">${esc(n.name)}</text>`;
    svg += `<text x="${p.x}" y="${p.y + 38}" font-size="10" text-anchor="middle" fill="#5b6673">${esc(fmtRtt(n.conn?.rttMs))}</text></g>`;
  }
  $("#graph").innerHTML = svg;

  const owners = new Map<string, { blocks: number; cidrs: string[] }>();
  for (const c of conns.values()) for (const o of c.state?.ipam.owners ?? []) owners.set(o.id, o);
  $("#nodes tbody").innerHTML = list
    .map((n) => {
      const o = owners.get(n.id);
      const st = n.state;
      return `<tr data-node="${n.id}" data-pongs="${n.conn?.pongs ?? 0}"><td>${esc(n.name)}</td><td><code>${n.id}</code></td><td>${esc(st?.node.transport ?? "-")}</td>` +
        `<td>${o ? `${o.blocks} (${esc(o.cidrs.slice(0, 3).join(", "))}${o.cidrs.length > 3 ? ", …" : ""})` : "0"}</td><td class="num">${st ? st.ipam.pods : "-"}</td>` +
        `<td>${st ? (st.node.signal.connected ? "connected" : "DISCONNECTED") : "-"}</td><td class="num rtt">${esc(fmtRtt(n.conn?.rttMs))}</td></tr>`;
    })
    .join("");
  $("#links tbody").innerHTML = [...links]
    .sort((x, y) => [x[1].a.name, x[1].b.name].sort().join().localeCompare([y[1].a.name, y[1].b.name].sort().join()))
    .map(([key, l]) => `<tr data-link="${key}" data-path="${esc(pathClass(l.info))}"><td>${esc([l.a.name, l.b.name].sort().join(" ↔ "))}</td><td>${esc(l.info.path === "direct" && l.info.linkType ? (l.info.linkType === "webrtc" ? "direct" : l.info.linkType) : l.info.path)}</td>` +
      `<td class="num">${esc(fmtRtt(l.info.rttMs))}</td><td class="num">${esc(fmtRate(l.rate))}</td><td class="num"${l.info.pmtuHow ? ` title="path MTU: ${esc(l.info.pmtuHow)}"` : ""}>${l.info.pathMtu ?? (l.info.pmtuHow === "fixed" ? "fixed" : "-")}</td><td class="why">${esc(why(l.info))}</td></tr>`)
    .join("");

  for (const [sel, all] of [["#ping-from", false], ["#ping-target", true]] as const) {
    const s = $<HTMLSelectElement>(sel);
    const opts = list.filter((n) => all || n.conn).map((n) => n.id);
    if (s.options.length !== opts.length || [...s.options].some((o, i) => o.value !== opts[i])) {
      const keep = s.value;
      s.innerHTML = opts.map((id) => `<option value="${id}">${esc(nodes.get(id)!.name)}</option>`).join("");
      if (opts.includes(keep)) s.value = keep;
    }
  }
}

async function pingNode(): Promise<void> {
  const from = conns.get($<HTMLSelectElement>("#ping-from").value);
  const target = $<HTMLSelectElement>("#ping-target").value;
  const out = $("#ping-result");
  if (!from || !target) return;
  out.textContent = "…";
  const r = await request(from, { t: "ping-node", target });
  const route = Array.isArray(r.route) ? ` route ${(r.route as string[]).map((id) => conns.get(id)?.name ?? id).join(" > ")}` : "";
  out.textContent = r.ok ? `${from.name} → ${String(r.name)}: ${fmtRtt(Number(r.rttMs))} via ${String(r.path)}${route}` : `${from.name} → ${target}: ${String(r.error)}`;
  out.dataset.path = r.ok ? String(r.path) : "";
}

setInterval(() => {
  for (const c of conns.values()) if (c.authed) send(c, { t: "ping", seq: ++seq, ts: performance.now() });
}, 1000);

$("#join").addEventListener("submit", (ev) => void join(ev));
$("#ping").addEventListener("click", () => void pingNode());
const hashParams = new URLSearchParams(location.hash.slice(1));
const fromHash = hashParams.get("invite") ?? hashParams.get("token");
if (fromHash) {
  $<HTMLInputElement>("#credential").value = fromHash;
  history.replaceState(null, "", location.pathname);
  // an invite link joins at once (it grants viewing only); a token waits for the Join button
  if (fromHash.startsWith("wv1.")) $<HTMLFormElement>("#join").requestSubmit();
}
