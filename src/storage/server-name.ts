/**
 * The server name a database belongs to (`mxkeys_server`). Every user ID in the database ends in
 * it, so a database is bound to one server name for good: it is recorded on first use, and a
 * process configured with another name is refused before it can register `@dave:new` next to
 * `@dave:old`.
 */
import type { SqlDatabase } from './sql.js';

export class ServerNameMismatchError extends Error {
  constructor(
    readonly databaseServerName: string,
    readonly configuredServerName: string,
    how: string,
  ) {
    super(
      `config key "server_name" is "${configuredServerName}", but this database belongs to "${databaseServerName}" (${how}). ` +
        'The server name is part of every user ID and cannot change once a database is in use. ' +
        `Set server_name back to "${databaseServerName}", or give "${configuredServerName}" a new, empty database (database.sqlite or database.postgres).`,
    );
    this.name = 'ServerNameMismatchError';
  }
}

/** The part after the first `:` of a user ID. */
function serverPart(userId: string): string {
  return userId.slice(userId.indexOf(':') + 1);
}

/**
 * Records `serverName` as the database's server name if none is recorded yet, or checks it against
 * the recorded one. A database from before the name was recorded is judged by its users' IDs.
 */
export async function claimServerName(db: SqlDatabase, serverName: string, now = Date.now()): Promise<void> {
  await db.transaction(async (tx) => {
    const recorded = await tx.get<{ server_name: string }>('SELECT server_name FROM mxkeys_server WHERE id = 1');
    if (recorded) {
      if (recorded.server_name !== serverName) throw new ServerNameMismatchError(recorded.server_name, serverName, 'recorded when it was first used');
      return;
    }
    const user = await tx.get<{ user_id: string }>('SELECT user_id FROM users ORDER BY created_ts, user_id LIMIT 1');
    if (user && serverPart(user.user_id) !== serverName) {
      throw new ServerNameMismatchError(serverPart(user.user_id), serverName, `its users are named like ${user.user_id}`);
    }
    await tx.run('INSERT INTO mxkeys_server (id, server_name, recorded_ts) VALUES (1, ?, ?) ON CONFLICT (id) DO NOTHING', [serverName, now]);
    // Another process may have recorded a name first (its insert won); read what stands now.
    const after = await tx.get<{ server_name: string }>('SELECT server_name FROM mxkeys_server WHERE id = 1');
    if (after && after.server_name !== serverName) throw new ServerNameMismatchError(after.server_name, serverName, 'recorded when it was first used');
  });
}
