/**
 * StatsStore: figures for metrics, read at scrape time. `e2e_one_time_key_counts` is kept by
 * triggers (migration 10) and, on PostgreSQL, by the claims themselves (migration 13), so "devices running out of one-time keys" is one pass over one narrow
 * row per device instead of a count over every stored key.
 */
import type { SqlDatabase } from './sql.js';
import type { StatsStore } from './store.js';

export class SqlStatsStore implements StatsStore {
  constructor(private readonly db: SqlDatabase) {}

  async devicesWithFewOneTimeKeys(limits: readonly number[]): Promise<number[]> {
    if (limits.length === 0) return [];
    const columns = limits.map((_, i) => `COALESCE(SUM(CASE WHEN n < ? THEN 1 ELSE 0 END), 0) AS c${i}`).join(', ');
    const row = await this.db.get<Record<string, number | string>>(`SELECT ${columns} FROM e2e_one_time_key_counts`, [...limits]);
    // PostgreSQL's SUM over integers is numeric, which the driver returns as text.
    return limits.map((_, i) => Number(row?.[`c${i}`] ?? 0));
  }
}
