/**
 * coturn for the TURN-over-IPv6 tests (test/integration/turn-ipv6.test.ts, test/e2e/turn-ipv6.test.ts): the
 * command line of a turnserver that listens on [::1] only, relays on 127.0.0.1 and ::1 (libjuice asks for no
 * address family: an IPv6-only relay refuses the allocation with 440), REST shared-secret auth as the agents
 * get it, and loopback peers allowed (coturn 4.6 refuses them by default; the relayed addresses are on lo).
 */
export function coturnV6Args(port: number, secret: string, dir: string): string[] {
  // prettier-ignore
  return [
    "-n", "--listening-ip", "::1", "--relay-ip", "127.0.0.1", "--relay-ip", "::1", "--listening-port", String(port),
    "--use-auth-secret", "--static-auth-secret", secret, "--realm", "weftnet",
    "--allow-loopback-peers", "--no-multicast-peers",
    "--no-tls", "--no-dtls", "--no-cli", "--no-rfc5780", "--no-stun-backward-compatibility",
    "--min-port", "49152", "--max-port", "65535", "--log-file", "stdout", "--simple-log",
    "--pidfile", `${dir}/turnserver.pid`, "--userdb", `${dir}/turndb.sqlite`,
  ];
}
