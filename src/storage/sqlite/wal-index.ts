/**
 * Telling that another connection committed without running a statement. In WAL mode every
 * connection shares the wal-index, the `-shm` file next to the database, whose header changes
 * with every committed transaction (its iChange counter, mxFrame and checksums; "WAL-mode File
 * Format", sqlite.org/walformat.html, section 2.1). Reading the header is one pread; `PRAGMA
 * data_version` opens a read transaction, with its file locks, which costs several times more.
 */
import { closeSync, openSync, readSync } from 'node:fs';
import { endianness } from 'node:os';

/** The header is 48 bytes, and SQLite keeps two copies of it, one after the other. */
const HEADER = 48;
/** The `isInit` byte: 0 until a connection has built the wal-index. */
const IS_INIT = 12;
/** mxFrame: how many frames of the WAL hold committed pages (the wal-index is in native byte order). */
const MX_FRAME = 16;
const LITTLE_ENDIAN = endianness() === 'LE';

export class WalIndexHeader {
  private readonly fd: number;
  private readonly read = Buffer.alloc(2 * HEADER);
  private readonly last = Buffer.alloc(HEADER);

  /** Throws when the file cannot be opened (no WAL, or an in-memory database). */
  constructor(shmPath: string) {
    this.fd = openSync(shmPath, 'r');
  }

  /**
   * True when the header differs from the one seen at the last call. SQLite writes the second
   * copy, then the first; two copies that differ were read mid-update, which counts as a change
   * (a commit that has not finished updating them has not returned to its caller either).
   */
  changed(): boolean {
    const n = readSync(this.fd, this.read, 0, 2 * HEADER, 0);
    const first = this.read.subarray(0, HEADER);
    if (n < 2 * HEADER || this.read[IS_INIT] === 0 || !first.equals(this.read.subarray(HEADER))) return true;
    if (first.equals(this.last)) return false;
    first.copy(this.last);
    return true;
  }

  /** The WAL's length in frames (pages), as the header says; 0 when it cannot be read. */
  frames(): number {
    if (readSync(this.fd, this.read, 0, HEADER, 0) < HEADER) return 0;
    return LITTLE_ENDIAN ? this.read.readUInt32LE(MX_FRAME) : this.read.readUInt32BE(MX_FRAME);
  }

  close(): void {
    closeSync(this.fd);
  }
}
