/**
 * The packet-device port: what the data path needs from a TUN device. agent/os/tun.ts implements it on
 * Linux; a memory fake (src/testing) can implement it for tests without root.
 *
 * Packets are always (virtio_net_hdr + IP packet) when `vnetHdr` is true, plain IP packets otherwise.
 */
import type { DropCounters } from "./drop.js";

export interface PacketDeviceStats {
  rxPackets: number;
  rxBytes: number;
  rxBatches: number;
  txPackets: number;
  txBytes: number;
  /** Largest packet read so far (> MTU means GSO super-packets are arriving). */
  rxMaxPacket: number;
}

export interface PacketDevice {
  readonly name: string;
  readonly vnetHdr: boolean;
  /** Write-side drops (queue-full on EAGAIN, write-failed on other errors). */
  readonly drops: DropCounters;
  readonly stats: PacketDeviceStats;
  /**
   * Start delivering packets read from the device, a batch at a time. Packets are subarrays that stay
   * valid after the callback returns (they are never overwritten), so they may be queued without copying.
   * onError: the read loop hit an unrecoverable error and stopped (an exception thrown by onBatch is
   * passed here too, and reading continues).
   */
  start(onBatch: (packets: Uint8Array[]) => void, onError?: (err: Error) => void): void;
  /** Stop reading after the current batch (backpressure: the kernel queue fills and drops, TCP backs off). */
  pause(): void;
  resume(): void;
  readonly paused: boolean;
  /** Non-blocking writes; returns how many packets the kernel took. Failures are counted in `drops`. */
  writeBatch(packets: readonly Uint8Array[]): number;
  /**
   * Optional: read now what is already waiting, without waiting for the next readiness event (the data plane
   * calls it right after a write: a ping's reply or a TCP ACK the kernel produced during the write is then
   * forwarded in the same turn of the event loop). Does nothing while reading is paused or already scheduled.
   */
  readNow?(): void;
  /** Stop reading and release the device. Resolves once no native call is in flight. Idempotent. */
  close(): Promise<void>;
}
