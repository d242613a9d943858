/**
 * Read results kept in memory for as long as nothing in the database changed. Validity is the
 * database's data generation (SqlDatabase.dataGeneration): any write by this process or commit
 * by another connection moves it on and empties the cache, so a hit is exactly what a statement
 * would have read, across several processes sharing one database. On PostgreSQL, commits by
 * other processes are learnt through LISTEN/NOTIFY, within database.cache_staleness_bound
 * (postgres/change-listener.ts); with that set to 0 there is no cache and every read is a statement.
 */
export interface ReadCacheLimits<V> {
  /** Entries kept at most (default 10,000). */
  readonly maxEntries?: number;
  /** With `sizeOf`: the bytes kept at most, as `sizeOf` counts them. */
  readonly maxBytes?: number;
  readonly sizeOf?: (value: V) => number;
}

export class ReadCache<V> {
  private readonly entries = new Map<string, V>();
  private generation = -1;
  private bytes = 0;
  private readonly maxEntries: number;

  constructor(
    private readonly currentGeneration: () => number,
    private readonly limits: ReadCacheLimits<V> = {},
  ) {
    this.maxEntries = limits.maxEntries ?? 10_000;
  }

  /** The value for `key`: cached, or from `read` (kept unless undefined). */
  async get(key: string, read: () => Promise<V | undefined>): Promise<V | undefined> {
    const generation = this.sync();
    const hit = this.entries.get(key);
    if (hit !== undefined) return hit;
    const value = await read();
    if (value !== undefined) this.keep(generation, key, value);
    return value;
  }

  /** The values for `keys`: those cached, and the rest from one `read` of the missing keys. */
  async getMany(keys: readonly string[], read: (missing: string[]) => Promise<Map<string, V>>): Promise<Map<string, V>> {
    const generation = this.sync();
    const out = new Map<string, V>();
    const missing: string[] = [];
    for (const key of keys) {
      const hit = this.entries.get(key);
      if (hit !== undefined) out.set(key, hit);
      else missing.push(key);
    }
    if (missing.length > 0) {
      for (const [key, value] of await read(missing)) {
        out.set(key, value);
        this.keep(generation, key, value);
      }
    }
    return out;
  }

  /** The current generation, emptying the cache when it moved on. */
  private sync(): number {
    const generation = this.currentGeneration();
    if (generation !== this.generation) {
      this.clear();
      this.generation = generation;
    }
    return generation;
  }

  private keep(generation: number, key: string, value: V): void {
    // What was read is at least as new as `generation`; any change since moves the generation
    // on, which discards it. If another caller already saw a newer generation, the value may be
    // older than what that generation holds: not kept.
    if (this.generation !== generation) return;
    const size = this.limits.sizeOf?.(value) ?? 0;
    if (this.entries.size >= this.maxEntries || this.bytes + size > (this.limits.maxBytes ?? Infinity)) this.clear();
    if (this.entries.has(key)) return;
    this.entries.set(key, value);
    this.bytes += size;
  }

  private clear(): void {
    this.entries.clear();
    this.bytes = 0;
  }
}

/** A ReadCache when the database has a data generation, else undefined. */
export function readCacheFor<V>(db: { dataGeneration?: () => number }, limits?: ReadCacheLimits<V>): ReadCache<V> | undefined {
  const generation = db.dataGeneration;
  return generation ? new ReadCache<V>(generation, limits) : undefined;
}
