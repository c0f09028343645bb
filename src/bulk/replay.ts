/**
 * Sliding replay window for the bulk link's 64-bit datagram counters, after wireguard-go's replay/replay.go
 * (itself RFC 6479): a ring of bit blocks; a counter is accepted once, if it is newer than the newest seen
 * or at most WINDOW_SIZE behind it. Moving forward clears the blocks the window slides over, so the cost is
 * O(1) per datagram however far the counter jumps.
 *
 * Blocks are 32 bits here (JS bit operations are 32-bit), 256 of them: the window is (256 - 1) * 32 = 8160
 * counters, wider than wireguard-go's 8128, so a burst reordered by GSO/GRO batching or a multi-queue NIC
 * is never mistaken for a replay. Counters are JS numbers: a key is rotated long before 2^53 (session.ts).
 *
 * Call validate() only for a datagram that authenticated: an attacker must not be able to move the window.
 */
const BLOCK_BIT_LOG = 5;
const BLOCK_BITS = 1 << BLOCK_BIT_LOG;
const RING_BLOCKS = 1 << 8;
export const WINDOW_SIZE = (RING_BLOCKS - 1) * BLOCK_BITS;
const BLOCK_MASK = RING_BLOCKS - 1;
const BIT_MASK = BLOCK_BITS - 1;

export class ReplayWindow {
  private last = 0;
  private readonly ring = new Uint32Array(RING_BLOCKS);

  reset(): void {
    this.last = 0;
    this.ring.fill(0);
  }

  /** Accept `counter` (and remember it) unless it is at/over `limit`, too old, or seen before. */
  validate(counter: number, limit = Number.MAX_SAFE_INTEGER): boolean {
    if (!(counter >= 0) || counter >= limit || !Number.isSafeInteger(counter)) return false;
    let indexBlock = Math.floor(counter / BLOCK_BITS);
    if (counter > this.last) {
      const current = Math.floor(this.last / BLOCK_BITS);
      let diff = indexBlock - current;
      if (diff > RING_BLOCKS) diff = RING_BLOCKS;
      for (let i = current + 1; diff > 0; i++, diff--) this.ring[i & BLOCK_MASK] = 0;
      this.last = counter;
    } else if (this.last - counter > WINDOW_SIZE) {
      return false;
    }
    indexBlock &= BLOCK_MASK;
    const bit = 1 << (counter & BIT_MASK);
    const old = this.ring[indexBlock]!;
    if ((old & bit) !== 0) return false;
    this.ring[indexBlock] = old | bit;
    return true;
  }
}
