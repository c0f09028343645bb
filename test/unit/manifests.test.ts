/**
 * The deployment files, read as a cluster or systemd would read them (no cluster here):
 *   examples/kubernetes/weftnet.yaml  every YAML document parses; the DaemonSet has what the agent needs
 *                                     (host network, NET_ADMIN + NET_RAW only, not privileged, state
 *                                     hostPath, /dev/net/tun, netns mounts, the CNI install init
 *                                     container, the token Secret), RBAC is minimal, one image everywhere
 *   Dockerfile                        agrees with the manifests (entrypoint, CNI binary path)
 *   examples/systemd/*.service        an INI parse finds the restart policy, state dir, token credential
 *                                     and hardening; `systemd-analyze verify` when it is installed
 * Flags used in the manifests and units must exist in the CLI's help.
 */
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { parseAllDocuments } from "yaml";
import { AGENT_HELP } from "../../agent/cli/commands.js";
import { SIGNAL_HELP } from "../../signaling/cli.js";

const root = join(import.meta.dirname, "..", "..");
const read = (p: string) => readFileSync(join(root, p), "utf8");

/* eslint-disable @typescript-eslint/no-explicit-any */
type Obj = Record<string, any>;

function loadManifests(): Obj[] {
  const docs = parseAllDocuments(read("examples/kubernetes/weftnet.yaml"));
  const out: Obj[] = [];
  for (const d of docs) {
    expect(d.errors.map((e) => e.message)).toEqual([]);
    expect(d.warnings.map((e) => e.message)).toEqual([]);
    const v = d.toJS() as Obj | null;
    if (v !== null) out.push(v);
  }
  return out;
}

const kinds = (docs: Obj[], kind: string) => docs.filter((d) => d.kind === kind);
const one = (docs: Obj[], kind: string): Obj => {
  const k = kinds(docs, kind);
  expect(k, kind).toHaveLength(1);
  return k[0]!;
};

/** `--flag` names in an argument list (--flag=value or --flag value). */
const flagsOf = (args: string[]) => args.filter((a) => a.startsWith("--")).map((a) => a.split("=")[0]!);

describe("examples/kubernetes/weftnet.yaml", () => {
  const docs = loadManifests();
  const ds = one(docs, "DaemonSet");
  const pod = ds.spec.template.spec as Obj;
  const agent = (pod.containers as Obj[]).find((c) => c.name === "agent")!;
  const volumes = new Map<string, Obj>((pod.volumes as Obj[]).map((v) => [v.name, v]));
  const mountOf = (c: Obj, path: string) => (c.volumeMounts as Obj[]).find((m) => m.mountPath === path);
  const volumeFor = (c: Obj, path: string) => {
    const m = mountOf(c, path);
    expect(m, `a mount at ${path}`).toBeDefined();
    const v = volumes.get(m!.name);
    expect(v, `volume ${m!.name}`).toBeDefined();
    return { mount: m!, volume: v! };
  };

  it("every document is a well-formed object in the weftnet namespace", () => {
    expect(docs.length).toBeGreaterThanOrEqual(7);
    for (const d of docs) {
      expect(typeof d.apiVersion, JSON.stringify(d).slice(0, 80)).toBe("string");
      expect(typeof d.kind).toBe("string");
      expect(typeof d.metadata?.name).toBe("string");
      if (d.kind !== "Namespace" && d.kind !== "ClusterRole" && d.kind !== "ClusterRoleBinding") expect(d.metadata.namespace, `${d.kind}/${d.metadata.name}`).toBe("weftnet");
    }
    expect(one(docs, "Namespace").metadata.name).toBe("weftnet");
    expect(one(docs, "ServiceAccount").metadata.name).toBe("weftnet");
    // no 0-prefixed numbers: kubectl (YAML 1.1) reads 0400 as octal, YAML 1.2 parsers as decimal
    expect(read("examples/kubernetes/weftnet.yaml")).not.toMatch(/:\s+0[0-7]+\s*(#.*)?$/m);
    // the Namespace comes first, so one `kubectl apply -f` creates it before what lives in it
    expect(docs[0]!.kind).toBe("Namespace");
  });

  it("the DaemonSet runs the agent on the host network, on every node, with state on the host", () => {
    expect(ds.apiVersion).toBe("apps/v1");
    expect(ds.spec.selector.matchLabels).toEqual(Object.fromEntries(Object.entries(ds.spec.template.metadata.labels).filter(([k]) => k in ds.spec.selector.matchLabels)));
    expect(pod.hostNetwork).toBe(true);
    expect(pod.hostPID ?? false).toBe(false);
    expect(pod.hostIPC ?? false).toBe(false);
    expect(pod.dnsPolicy).toBe("ClusterFirstWithHostNet");
    expect(pod.serviceAccountName).toBe("weftnet");
    // tolerate every taint: an empty key with operator Exists
    expect(pod.tolerations).toContainEqual({ operator: "Exists" });
    expect(agent.args[0]).toBe("agent");
    const args = agent.args as string[];
    expect(args).toContain("--state-dir=/var/lib/weftnet");
    expect(args).toContain("--token-file=/etc/weftnet/token");
    expect(args.some((a) => a.startsWith("--signal="))).toBe(true);
    expect(args.some((a) => a.startsWith("--reclaim-after="))).toBe(true);
    expect(args).not.toContain("--no-tun");
    for (const f of flagsOf(args)) expect(AGENT_HELP, `agent flag ${f}`).toContain(`  ${f} `);
    // every $(VAR) in args is defined in env (kubelet leaves unknown references as they are)
    const env = new Set((agent.env as Obj[]).map((e) => e.name));
    for (const a of args) for (const m of a.matchAll(/\$\((\w+)\)/g)) expect(env.has(m[1]!), `$(${m[1]}) defined`).toBe(true);
    expect(agent.resources.requests.cpu).toBeDefined();
    expect(agent.resources.requests.memory).toBeDefined();
    expect(agent.resources.limits.memory).toBeDefined();
    expect(agent.livenessProbe).toBeDefined();
    expect(agent.livenessProbe.httpGet.path).toBe("/metrics");
    // unauthenticated metrics stay on the host's loopback (hostNetwork): not reachable from other hosts or pods
    expect(args).toContain(`--metrics-listen=127.0.0.1:${agent.livenessProbe.httpGet.port}`);
    expect(agent.livenessProbe.httpGet.host).toBe("127.0.0.1");
  });

  it("the agent gets NET_ADMIN and NET_RAW and nothing else: not privileged, no escalation", () => {
    const sc = agent.securityContext as Obj;
    expect(sc.privileged ?? false).toBe(false);
    expect(sc.allowPrivilegeEscalation).toBe(false);
    expect(sc.capabilities.drop).toEqual(["ALL"]);
    expect([...sc.capabilities.add].sort()).toEqual(["NET_ADMIN", "NET_RAW"]);
    expect(sc.readOnlyRootFilesystem).toBe(true);
    for (const c of [...(pod.initContainers as Obj[]), ...(pod.containers as Obj[])]) {
      expect(c.securityContext?.privileged ?? false, c.name).toBe(false);
      expect(c.securityContext?.capabilities?.drop, c.name).toEqual(["ALL"]);
      expect(c.securityContext?.capabilities?.add ?? [], c.name).not.toContain("SYS_ADMIN");
    }
  });

  it("volumes: state dir, /dev/net/tun, pods' netns (HostToContainer: Bidirectional needs privileged), iptables lock", () => {
    const state = volumeFor(agent, "/var/lib/weftnet");
    expect(state.volume.hostPath).toEqual({ path: "/var/lib/weftnet", type: "DirectoryOrCreate" });
    const tun = volumeFor(agent, "/dev/net/tun");
    expect(tun.volume.hostPath).toEqual({ path: "/dev/net/tun", type: "CharDevice" });
    for (const p of ["/run/netns", "/var/run/netns"]) {
      const ns = volumeFor(agent, p);
      expect(ns.volume.hostPath.path).toBe(p);
      expect(ns.mount.mountPropagation).toBe("HostToContainer");
      // the API server refuses Bidirectional propagation in a container that is not privileged
      if (ns.mount.mountPropagation === "Bidirectional") expect(agent.securityContext.privileged).toBe(true);
    }
    expect(volumeFor(agent, "/run/xtables.lock").volume.hostPath).toEqual({ path: "/run/xtables.lock", type: "FileOrCreate" });
    // every mount names a volume and every volume is used
    const used = new Set<string>();
    for (const c of [...(pod.initContainers as Obj[]), ...(pod.containers as Obj[])]) for (const m of c.volumeMounts as Obj[]) {
      expect(volumes.has(m.name), `volume ${m.name}`).toBe(true);
      used.add(m.name);
    }
    expect([...volumes.keys()].filter((v) => !used.has(v))).toEqual([]);
  });

  it("the token comes from the Secret, as a read-only file the agent reads with --token-file", () => {
    const secret = one(docs, "Secret");
    expect(secret.metadata.name).toBe("weftnet-token");
    expect(typeof secret.stringData.token).toBe("string");
    const t = volumeFor(agent, "/etc/weftnet");
    expect(t.mount.readOnly).toBe(true);
    expect(t.volume.secret.secretName).toBe(secret.metadata.name);
    expect(t.volume.secret.items).toEqual([{ key: "token", path: "token" }]);
    expect(t.volume.secret.defaultMode).toBe(0o400);
    // never a token on the command line or in a plain env value
    const all = JSON.stringify(docs.filter((d) => d.kind !== "Secret"));
    expect(all).not.toContain(secret.stringData.token);
    expect(all).not.toMatch(/--token[= ]/);
  });

  it("the init container installs the CNI plugin binary and its conflist, binary first", () => {
    const init = (pod.initContainers as Obj[]).find((c) => c.name === "install-cni")!;
    expect(init).toBeDefined();
    const script = [...(init.command ?? []), ...(init.args ?? [])].join("\n");
    const bin = volumeFor(init, "/host/opt/cni/bin");
    expect(bin.volume.hostPath.path).toBe("/opt/cni/bin");
    const conf = volumeFor(init, "/host/etc/cni/net.d");
    expect(conf.volume.hostPath.path).toBe("/etc/cni/net.d");
    expect(script).toContain("/app/dist/cni/weftnet-cni");
    const binAt = script.indexOf("/host/opt/cni/bin/weftnet-cni");
    const confAt = script.indexOf("/host/etc/cni/net.d/10-weftnet.conflist");
    expect(binAt).toBeGreaterThan(0);
    expect(confAt).toBeGreaterThan(binAt);
    // the conflist comes from the ConfigMap: valid JSON, one plugin whose type is the binary's name
    const cfgMount = volumeFor(init, "/etc/weftnet-cni");
    const cm = kinds(docs, "ConfigMap").find((c) => c.metadata.name === cfgMount.volume.configMap.name)!;
    const conflist = JSON.parse(cm.data["10-weftnet.conflist"]) as Obj;
    expect(["1.0.0", "1.1.0"]).toContain(conflist.cniVersion);
    expect(conflist.name).toBe("weftnet");
    expect(conflist.plugins[0].type).toBe("weftnet-cni");
    expect(conflist.plugins[0].stateDir).toBe("/var/lib/weftnet");
    // the plugin finds the agent at <stateDir>/agent.sock: the agent's state dir on the host
    expect(volumeFor(agent, "/var/lib/weftnet").volume.hostPath.path).toBe(conflist.plugins[0].stateDir);
  });

  it("RBAC is minimal: get/list/watch on nodes, nothing else, bound to the agent's service account only", () => {
    // the agent watches Node objects (--k8s-node-watch) to release a deleted Node's address blocks
    expect(kinds(docs, "Role")).toHaveLength(0);
    expect(kinds(docs, "RoleBinding")).toHaveLength(0);
    const role = one(docs, "ClusterRole");
    expect(role.apiVersion).toBe("rbac.authorization.k8s.io/v1");
    expect(role.rules).toEqual([{ apiGroups: [""], resources: ["nodes"], verbs: ["get", "list", "watch"] }]);
    expect(role.aggregationRule).toBeUndefined();
    const binding = one(docs, "ClusterRoleBinding");
    expect(binding.roleRef).toEqual({ apiGroup: "rbac.authorization.k8s.io", kind: "ClusterRole", name: role.metadata.name });
    const sa = one(docs, "ServiceAccount");
    expect(binding.subjects).toEqual([{ kind: "ServiceAccount", name: sa.metadata.name, namespace: sa.metadata.namespace }]);
    // a token only where it is used: the agent's pods mount it, the service account and the signaling server do not
    expect(pod.serviceAccountName).toBe(sa.metadata.name);
    expect(pod.automountServiceAccountToken).toBe(true);
    expect(sa.automountServiceAccountToken).toBe(false);
    expect(one(docs, "Deployment").spec.template.spec.automountServiceAccountToken).toBe(false);
    // the watcher matches Nodes to agents by name: the agent's --name is the Node's name
    expect(agent.args).toContain("--name=$(NODE_NAME)");
    expect((agent.env as Obj[]).find((e) => e.name === "NODE_NAME")?.valueFrom).toEqual({ fieldRef: { fieldPath: "spec.nodeName" } });
    expect(agent.args).not.toContain("--no-k8s-node-watch");
  });

  it("the signaling server: one replica on the host network, unprivileged, behind a Service", () => {
    const dep = one(docs, "Deployment");
    const spec = dep.spec.template.spec as Obj;
    const c = spec.containers[0] as Obj;
    expect(dep.spec.replicas).toBe(1);
    expect(spec.hostNetwork).toBe(true);
    expect(spec.tolerations).toContainEqual({ key: "node.kubernetes.io/not-ready", operator: "Exists", effect: "NoSchedule" });
    expect(spec.securityContext.runAsNonRoot).toBe(true);
    expect(c.securityContext.capabilities).toEqual({ drop: ["ALL"] });
    expect(c.args[0]).toBe("signal");
    for (const f of flagsOf(c.args)) expect(SIGNAL_HELP, `signal flag ${f}`).toContain(`  ${f} `);
    const svc = one(docs, "Service");
    expect(svc.spec.selector).toEqual(Object.fromEntries(Object.entries(dep.spec.template.metadata.labels).filter(([k]) => k in svc.spec.selector)));
    const ports = new Map((svc.spec.ports as Obj[]).map((p) => [p.name, p]));
    expect(ports.get("signal")).toMatchObject({ protocol: "TCP", port: 7000 });
    expect(ports.get("stun")).toMatchObject({ protocol: "UDP", port: 3478 });
    // agents reach it through the Service's link env vars (the port's name makes _PORT_SIGNAL)
    const url = (agent.env as Obj[]).find((e) => e.name === "WEFTNET_SIGNAL_URL")!.value as string;
    expect(url).toBe(`ws://$(${svc.metadata.name.toUpperCase().replace(/-/g, "_")}_SERVICE_HOST):$(${svc.metadata.name.toUpperCase().replace(/-/g, "_")}_SERVICE_PORT_SIGNAL)`);
    expect(c.livenessProbe.httpGet).toEqual({ path: "/healthz", port: 7000 });
  });

  it("one image everywhere, and the Dockerfile builds what the manifests run", () => {
    const images = new Set<string>();
    for (const d of docs) {
      const spec = d.spec?.template?.spec as Obj | undefined;
      for (const c of [...(spec?.initContainers ?? []), ...(spec?.containers ?? [])]) images.add(c.image);
    }
    expect(images.size).toBe(1);
    const [image] = [...images];
    expect(image).toMatch(/^[a-z0-9.-]+(\/[a-z0-9._-]+)+:[0-9]+\.[0-9]+\.[0-9]+$/);
    const pkg = JSON.parse(read("package.json")) as { version: string };
    expect(image!.endsWith(`:${pkg.version}`)).toBe(true);
    const dockerfile = read("Dockerfile");
    expect(dockerfile).toContain(`docker build -t ${image} .`);
    expect(dockerfile).toMatch(/^FROM node:20-slim/m);
    expect(dockerfile).toMatch(/npm ci --omit=dev/);
    expect(dockerfile).toMatch(/iproute2 iptables/);
    expect(dockerfile).toMatch(/ENTRYPOINT \["node", "\/app\/dist\/agent\/cli\/main\.js"\]/);
    expect(dockerfile).toContain("/app/dist/cni/weftnet-cni");
    expect(dockerfile).toMatch(/NOT BUILT OR TESTED HERE/);
  });
});

/** systemd unit files: sections of key -> values (a key may repeat); comments and blank lines skipped. */
export function parseUnit(text: string): Map<string, Map<string, string[]>> {
  const out = new Map<string, Map<string, string[]>>();
  let section: Map<string, string[]> | undefined;
  let cont = "";
  for (const raw of text.split("\n")) {
    const line = cont + raw.trim();
    cont = "";
    if (line === "" || line.startsWith("#") || line.startsWith(";")) continue;
    if (line.endsWith("\\")) {
      cont = line.slice(0, -1) + " ";
      continue;
    }
    const s = /^\[([^\]]+)\]$/.exec(line);
    if (s) {
      section = new Map();
      out.set(s[1]!, section);
      continue;
    }
    const kv = /^([A-Za-z0-9]+)=(.*)$/.exec(line);
    if (!kv || !section) throw new Error(`not a unit file line: ${JSON.stringify(line)}`);
    const vals = section.get(kv[1]!) ?? [];
    vals.push(kv[2]!);
    section.set(kv[1]!, vals);
  }
  return out;
}

describe("examples/systemd", () => {
  const unit = (name: string) => parseUnit(read(`examples/systemd/${name}`));
  const get = (u: Map<string, Map<string, string[]>>, sec: string, key: string) => u.get(sec)?.get(key)?.at(-1);

  it("weftnet-agent.service: restart policy, state dir, token as a credential, NET_ADMIN kept, hardened", () => {
    const u = unit("weftnet-agent.service");
    expect([...u.keys()]).toEqual(["Unit", "Service", "Install"]);
    expect(get(u, "Unit", "After")).toContain("network-online.target");
    expect(get(u, "Unit", "Wants")).toContain("network-online.target");
    expect(get(u, "Service", "Restart")).toBe("on-failure");
    expect(get(u, "Service", "StateDirectory")).toBe("weftnet");
    expect(get(u, "Service", "LoadCredential")).toBe("token:/etc/weftnet/token");
    expect(get(u, "Service", "EnvironmentFile")).toBe("/etc/weftnet/agent.env");
    const exec = get(u, "Service", "ExecStart")!;
    expect(exec).toMatch(/ agent /);
    expect(exec).toContain("--token-file %d/token");
    expect(exec).toContain("--state-dir %S/weftnet");
    expect(exec).not.toMatch(/--token /);
    for (const f of flagsOf(exec.split(/\s+/))) expect(AGENT_HELP, `agent flag ${f}`).toContain(`  ${f} `);
    expect(get(u, "Service", "CapabilityBoundingSet")!.split(/\s+/).sort()).toEqual(["CAP_NET_ADMIN", "CAP_NET_RAW"]);
    expect(get(u, "Service", "AmbientCapabilities")!.split(/\s+/).sort()).toEqual(["CAP_NET_ADMIN", "CAP_NET_RAW"]);
    expect(get(u, "Service", "NoNewPrivileges")).toBe("yes");
    expect(get(u, "Service", "ProtectSystem")).toBe("strict");
    expect(get(u, "Service", "ProtectHome")).toBe("yes");
    expect(get(u, "Service", "PrivateTmp")).toBe("yes");
    expect(get(u, "Service", "ReadWritePaths")!.split(/\s+/)).toContain("/run/netns");
    expect(get(u, "Service", "DeviceAllow")).toBe("/dev/net/tun rw");
    // the agent writes net.ipv4.ip_forward and needs the TUN device: these must stay off
    expect(get(u, "Service", "ProtectKernelTunables")).toBeUndefined();
    expect(get(u, "Service", "PrivateDevices")).toBeUndefined();
    expect(get(u, "Service", "PrivateNetwork")).toBeUndefined();
    expect(get(u, "Service", "RestrictAddressFamilies")!.split(/\s+/)).toEqual(expect.arrayContaining(["AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"]));
    expect(get(u, "Install", "WantedBy")).toBe("multi-user.target");
  });

  it("weftnet-agent-pods.conf: the documented CAP_SYS_ADMIN trade-off for `weftnet pod add`", () => {
    const u = unit("weftnet-agent-pods.conf");
    expect(get(u, "Service", "CapabilityBoundingSet")!.split(/\s+/).sort()).toEqual(["CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_SYS_ADMIN"]);
    expect(get(u, "Service", "PrivateTmp")).toBe("no");
    expect(read("examples/systemd/weftnet-agent.service")).toMatch(/CAP_SYS_ADMIN/);
  });

  it("weftnet-signal.service: unprivileged, no capabilities, token as a credential", () => {
    const u = unit("weftnet-signal.service");
    expect(get(u, "Service", "Restart")).toBe("on-failure");
    expect(get(u, "Service", "DynamicUser")).toBe("yes");
    expect(get(u, "Service", "StateDirectory")).toBe("weftnet-signal");
    expect(get(u, "Service", "LoadCredential")).toBe("token:/etc/weftnet/token");
    expect(get(u, "Service", "CapabilityBoundingSet")).toBe("");
    expect(get(u, "Service", "NoNewPrivileges")).toBe("yes");
    expect(get(u, "Service", "ProtectSystem")).toBe("strict");
    const exec = get(u, "Service", "ExecStart")!;
    expect(exec).toMatch(/ signal /);
    for (const f of flagsOf(exec.split(/\s+/))) expect(SIGNAL_HELP, `signal flag ${f}`).toContain(`  ${f} `);
  });

  it("agent.env.example sets WEFTNET_SIGNAL and no token", () => {
    const env = read("examples/systemd/agent.env.example");
    expect(env).toMatch(/^WEFTNET_SIGNAL=ws:\/\//m);
    expect(env).not.toMatch(/^WEFTNET_TOKEN=/m);
  });

  const analyze = spawnSync("systemd-analyze", ["--version"]).status === 0;
  it.skipIf(!analyze)("systemd-analyze verify accepts both units", () => {
    const dir = mkdtempSync(join(tmpdir(), "weft-units-"));
    try {
      const files: string[] = [];
      for (const name of ["weftnet-agent.service", "weftnet-signal.service"]) {
        // verify checks that ExecStart's binary exists; it is not installed here
        writeFileSync(join(dir, name), read(`examples/systemd/${name}`).replaceAll("/usr/local/bin/weftnet", "/bin/true"));
        files.push(join(dir, name));
      }
      const r = spawnSync("systemd-analyze", ["verify", ...files], { encoding: "utf8", cwd: dir });
      expect(`${r.stdout}${r.stderr}`.trim()).toBe("");
      expect(r.status).toBe(0);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
