/**
 * Ordered output toward the client. Every client command reserves a slot when it is
 * processed; its reply may come from the server or from the proxy, now or later, but slots
 * are written strictly in order (RFC 959 §4.2: replies follow commands). A slot may hold a
 * gate: the final transfer reply waits behind it until the relayed data has been flushed
 * (protocol.md §3.3), and every later reply waits too.
 */
export interface ReplySlot {
  readonly id: number;
}

interface SlotState extends ReplySlot {
  parts: Array<Buffer | Gate>;
  ended: boolean;
}

interface Gate {
  opened: boolean;
}

export class ReplyQueue {
  private readonly slots: SlotState[] = [];
  private nextId = 1;
  private queuedBytes = 0;
  private readonly write: (bytes: Buffer) => void;
  private readonly onChange: () => void;

  /**
   * @param write receives bytes in order
   * @param onChange called after every flush (for flow control and close-after-flush)
   */
  constructor(write: (bytes: Buffer) => void, onChange: () => void) {
    this.write = write;
    this.onChange = onChange;
  }

  /** Bytes accepted but not yet written (held behind a gate or an unfinished slot). */
  get bufferedBytes(): number {
    return this.queuedBytes;
  }

  get isEmpty(): boolean {
    return this.slots.length === 0;
  }

  open(): ReplySlot {
    const slot: SlotState = { id: this.nextId++, parts: [], ended: false };
    this.slots.push(slot);
    return slot;
  }

  push(slot: ReplySlot, bytes: Buffer): void {
    const state = slot as SlotState;
    if (state.ended) return;
    state.parts.push(bytes);
    this.queuedBytes += bytes.length;
    this.flush();
  }

  /** Nothing after this point of the slot is written before `until` settles. */
  gate(slot: ReplySlot, until: Promise<unknown>): void {
    const state = slot as SlotState;
    if (state.ended) return;
    const gate: Gate = { opened: false };
    state.parts.push(gate);
    const open = (): void => {
      gate.opened = true;
      this.flush();
    };
    until.then(open, open);
  }

  end(slot: ReplySlot): void {
    const state = slot as SlotState;
    if (state.ended) return;
    state.ended = true;
    this.flush();
  }

  /** A complete one-shot reply at the tail of the queue. */
  append(bytes: Buffer): void {
    const slot = this.open();
    this.push(slot, bytes);
    this.end(slot);
  }

  /** End every open slot (the server is gone; nothing more will come). */
  endAll(): void {
    for (const slot of this.slots) slot.ended = true;
    this.flush();
  }

  /** Drop everything (teardown). */
  clear(): void {
    this.slots.length = 0;
    this.queuedBytes = 0;
  }

  private flushing = false;
  private flush(): void {
    if (this.flushing) return;
    this.flushing = true;
    try {
      while (this.slots.length > 0) {
        const head = this.slots[0]!;
        while (head.parts.length > 0) {
          const part = head.parts[0]!;
          if (Buffer.isBuffer(part)) {
            head.parts.shift();
            this.queuedBytes -= part.length;
            this.write(part);
          } else if (part.opened) {
            head.parts.shift();
          } else {
            return;
          }
        }
        if (!head.ended) return;
        this.slots.shift();
      }
    } finally {
      this.flushing = false;
      this.onChange();
    }
  }
}
