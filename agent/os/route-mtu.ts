/**
 * The kernel's path MTU toward an address: the largest IP packet this host sends there with Don't Fragment
 * (the route's MTU, lowered by any ICMP "fragmentation needed" / "packet too big" the kernel has cached for
 * that destination). Read with a throwaway connected UDP socket and getsockopt(IP_MTU / IPV6_MTU) through
 * koffi, as the TUN and the bulk socket are; nothing is sent. Used as the local limit of the WebRTC link's
 * path MTU search (src/mesh/pmtu.ts): libjuice sets DF, so anything larger fails in sendto with EMSGSIZE.
 * undefined when it cannot be read (not Linux, koffi missing, an address it does not parse).
 */
import { isIPv4, isIPv6 } from "node:net";
import { baseLibc } from "./fd-reader.js";

const AF_INET = 2;
const AF_INET6 = 10;
const SOCK_DGRAM = 2;
const SOCK_CLOEXEC = 0o2000000;
const IPPROTO_IP = 0;
const IPPROTO_IPV6 = 41;
const IP_MTU = 14;
const IPV6_MTU = 24;

interface RouteLibc {
  close(fd: number): number;
  socket(d: number, t: number, p: number): number;
  connect(fd: number, addr: Uint8Array, len: number): number;
  getsockopt(fd: number, level: number, name: number, val: Uint8Array, len: Int32Array): number;
}

let libc: RouteLibc | null | undefined;

function load(): RouteLibc | null {
  if (libc !== undefined) return libc;
  try {
    if (process.platform !== "linux") return (libc = null);
    const b = baseLibc();
    libc = {
      close: b.close,
      socket: b.lib.func("int socket(int domain, int type, int protocol)") as RouteLibc["socket"],
      connect: b.lib.func("int connect(int fd, void *addr, uint32_t len)") as RouteLibc["connect"],
      getsockopt: b.lib.func("int getsockopt(int fd, int level, int name, void *val, void *len)") as RouteLibc["getsockopt"],
    };
  } catch {
    libc = null;
  }
  return libc;
}

/** 16 bytes of an IPv6 address (no zone), or undefined. Exported for tests. */
export function ipv6Bytes(a: string): Uint8Array | undefined {
  if (!isIPv6(a) || a.includes("%")) return undefined;
  let s = a;
  const tail: number[] = [];
  const v4 = /(\d+\.\d+\.\d+\.\d+)$/.exec(s);
  if (v4) {
    tail.push(...v4[1]!.split(".").map(Number));
    s = s.slice(0, -v4[1]!.length) + "0:0";
  }
  const [head, rest] = s.split("::") as [string, string | undefined];
  const parse = (p: string) => (p ? p.split(":").filter((x) => x !== "").map((x) => parseInt(x, 16)) : []);
  const h = parse(head);
  const r = rest === undefined ? [] : parse(rest);
  const groups = rest === undefined ? h : [...h, ...new Array<number>(8 - h.length - r.length).fill(0), ...r];
  if (groups.length !== 8) return undefined;
  const out = new Uint8Array(16);
  groups.forEach((g, i) => {
    out[2 * i] = g >> 8;
    out[2 * i + 1] = g & 0xff;
  });
  if (tail.length === 4) out.set(tail, 12);
  return out;
}

/** The kernel's path MTU (IP packet bytes) toward `address` (IPv4 or IPv6, no port), or undefined. */
export function kernelPathMtu(address: string): number | undefined {
  const c = load();
  if (!c) return undefined;
  let family: number;
  const sa = new Uint8Array(28);
  const dv = new DataView(sa.buffer);
  if (isIPv4(address)) {
    family = AF_INET;
    dv.setUint16(0, AF_INET, true);
    dv.setUint16(2, 9, false); // any port: connect() on UDP only picks the route
    sa.set(address.split(".").map(Number), 4);
  } else {
    const b = ipv6Bytes(address);
    if (!b) return undefined;
    family = AF_INET6;
    dv.setUint16(0, AF_INET6, true);
    dv.setUint16(2, 9, false);
    sa.set(b, 8);
  }
  const fd = c.socket(family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return undefined;
  try {
    if (c.connect(fd, sa, family === AF_INET ? 16 : 28) !== 0) return undefined;
    const val = new Uint8Array(4);
    const len = new Int32Array([4]);
    if (c.getsockopt(fd, family === AF_INET ? IPPROTO_IP : IPPROTO_IPV6, family === AF_INET ? IP_MTU : IPV6_MTU, val, len) !== 0) return undefined;
    const mtu = new DataView(val.buffer).getInt32(0, true);
    return mtu > 0 ? mtu : undefined;
  } finally {
    c.close(fd);
  }
}
