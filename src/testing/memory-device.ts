/**
 * Fakes for the data plane's ports, for tests without root (wireguard-go's tun/tuntest idea):
 *   MemoryDevice        a PacketDevice: `inject()` plays the kernel handing packets to the reader (held
 *                       back while paused, as the kernel's TUN queue would), `written` records writes
 *   RecordingNetwork    a NodeNetwork port: records every desired state applied, reports what changed
 * Synchronous and timer-free: the test drives them.
 */
import { DropCounters } from "../packet/drop.js";
import type { PacketDevice, PacketDeviceStats } from "../packet/device.js";
import type { DesiredNodeNetwork, NodeNetworkPort } from "../desired-network.js";

export class MemoryDevice implements PacketDevice {
  readonly drops = new DropCounters();
  readonly stats: PacketDeviceStats = { rxPackets: 0, rxBytes: 0, rxBatches: 0, txPackets: 0, txBytes: 0, rxMaxPacket: 0 };
  /** every packet written to the device (copies), in order */
  readonly written: Uint8Array[] = [];
  /** batches injected while paused, delivered in order on resume */
  readonly queue: Uint8Array[][] = [];
  paused = false;
  closed = false;
  private onBatch: ((packets: Uint8Array[]) => void) | undefined;
  private onError: ((err: Error) => void) | undefined;

  constructor(
    readonly name = "mem0",
    readonly vnetHdr = true,
  ) {}

  start(onBatch: (packets: Uint8Array[]) => void, onError?: (err: Error) => void): void {
    this.onBatch = onBatch;
    this.onError = onError;
  }

  /** The kernel has packets for the reader: delivered now, or queued while paused. */
  inject(batch: Uint8Array[]): void {
    if (this.closed) return;
    if (this.paused || !this.onBatch) {
      this.queue.push(batch);
      return;
    }
    this.read(batch);
  }

  private read(batch: Uint8Array[]): void {
    this.stats.rxBatches++;
    for (const p of batch) {
      this.stats.rxPackets++;
      this.stats.rxBytes += p.length;
      if (p.length > this.stats.rxMaxPacket) this.stats.rxMaxPacket = p.length;
    }
    try {
      this.onBatch!(batch);
    } catch (err) {
      this.onError?.(err as Error);
    }
  }

  pause(): void {
    this.paused = true;
  }

  resume(): void {
    this.paused = false;
    while (!this.paused && this.queue.length && this.onBatch) this.read(this.queue.shift()!);
  }

  writeBatch(packets: readonly Uint8Array[]): number {
    if (this.closed) {
      this.drops.drop("write-failed", packets.length);
      return 0;
    }
    for (const p of packets) {
      this.written.push(new Uint8Array(p));
      this.stats.txPackets++;
      this.stats.txBytes += p.length;
    }
    return packets.length;
  }

  async close(): Promise<void> {
    this.closed = true;
    this.onBatch = undefined;
  }
}

export class RecordingNetwork implements NodeNetworkPort {
  /** every state applied, in order */
  readonly applied: DesiredNodeNetwork[] = [];
  tornDown = false;
  /** make the next apply fail with this error (once) */
  failNext: Error | undefined;
  private last = "";

  async apply(d: DesiredNodeNetwork): Promise<string[]> {
    if (this.failNext) {
      const e = this.failNext;
      this.failNext = undefined;
      throw e;
    }
    this.applied.push(structuredClone(d));
    const key = JSON.stringify(d);
    const changes = key === this.last ? [] : [`apply ${key}`];
    this.last = key;
    return changes;
  }

  async teardown(): Promise<void> {
    this.tornDown = true;
  }
}
