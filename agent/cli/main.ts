#!/usr/bin/env node
/** The `weftnet` command: dispatches to subcommands. */
import { realpathSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { UsageError } from "../../src/errors.js";
import { VERSION } from "../version.js";
import { didYouMean, errorJson, errorLine, noAgentHint } from "./util.js";

const COMMANDS = ["signal", "agent", "status", "ping", "netcheck", "pod", "ipam", "keygen", "join-key", "invite", "version", "help"];

export const MAIN_HELP = `weftnet ${VERSION} — peer-to-peer WebRTC overlay network for pods

Usage: weftnet <command> [options]

Commands:
  signal     run the signaling server (matchmaker + STUN)
  agent      run the node agent
  status     show this node and its peers
  ping NODE  measure RTT to a peer over the mesh
  netcheck   this host's NAT behaviour (UDP reachable, reflexive address, cone or symmetric)
  pod        add NAME / del NAME: a pod (network namespace) on this node's bridge
  ipam       operator commands for the shared address range (release NODE, allocate/free POD)
  keygen     --operator --out F: the operator key pair (\`ipam release\` signs with it)
  join-key   print the join key of a cluster token (--token-file F): all the signaling server needs
  invite     mint a short-lived viewer invite for the signaling server's topology page (/ui)
  version    print the version

Run \`weftnet <command> --help\` for the options of each command.
`;

export async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  try {
    switch (cmd) {
      case undefined:
      case "help":
      case "-h":
      case "--help":
        process.stdout.write(MAIN_HELP);
        return cmd === undefined ? 2 : 0;
      case "version":
      case "--version":
      case "-v":
        process.stdout.write(`${VERSION}\n`);
        return 0;
      case "signal": {
        const { runSignal } = await import("../../signaling/cli.js");
        return await runSignal(rest);
      }
      case "agent":
        return await (await import("./commands.js")).runAgent(rest);
      case "status":
        return await (await import("./commands.js")).runStatus(rest);
      case "ping":
        return await (await import("./commands.js")).runPing(rest);
      case "netcheck":
        return await (await import("../netcheck.js")).runNetcheck(rest);
      case "pod":
        return await (await import("./commands.js")).runPod(rest);
      case "ipam":
        return await (await import("./commands.js")).runIpam(rest);
      case "keygen":
        return (await import("./operator.js")).runKeygen(rest);
      case "invite":
        return await (await import("./commands.js")).runInvite(rest);
      case "join-key": {
        // The signaling server needs only this (hello MAC, API Bearer), never the token: see src/identity.ts.
        const { parse, resolveToken } = await import("./util.js");
        const { values } = parse("join-key", rest, { token: { type: "string" }, "token-file": { type: "string" } });
        const token = resolveToken("join-key", values.token as string | undefined, values["token-file"] as string | undefined);
        if (token === undefined) throw new UsageError("weftnet join-key: give --token-file F (or --token T, or env WEFTNET_TOKEN)");
        process.stdout.write(`${(await import("../../src/identity.js")).joinKeyOf(token)}\n`);
        return 0;
      }
      default: {
        const hint = didYouMean(cmd, COMMANDS);
        throw new UsageError(`unknown command ${JSON.stringify(cmd)}${hint ? ` (did you mean \`weftnet ${hint}\`?)` : ""}; run \`weftnet --help\` for the list`);
      }
    }
  } catch (caught) {
    const e = noAgentHint(caught, rest.some((a) => a === "--state-dir" || a.startsWith("--state-dir=")));
    // With --json the error is JSON on stdout too ({error: {code, message}}), so scripts parse one format.
    if (rest.includes("--json")) process.stdout.write(`${errorJson(e)}\n`);
    else process.stderr.write(`${errorLine(e)}\n`);
    return e instanceof UsageError ? 2 : 1;
  }
}

function isMain(): boolean {
  try {
    return process.argv[1] !== undefined && realpathSync(process.argv[1]) === fileURLToPath(import.meta.url);
  } catch {
    return false;
  }
}
if (isMain()) {
  // Supervisors (the demo, tests) set this so the process never outlives them: when the parent dies,
  // our stdin pipe closes and we shut down like on SIGTERM.
  if (process.env.WEFTNET_EXIT_WITH_PARENT === "1") {
    process.stdin.on("end", () => process.kill(process.pid, "SIGTERM"));
    process.stdin.on("error", () => process.kill(process.pid, "SIGTERM"));
    process.stdin.resume();
  }
  // process.exit() right after a large write to a pipe would cut the output short (stdout to a pipe is
  // asynchronous): exit only once stdout and stderr have flushed.
  main(process.argv.slice(2)).then((code) => {
    process.stdout.write("", () => process.stderr.write("", () => process.exit(code)));
  });
}
