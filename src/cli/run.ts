/**
 * The command line: `mxkeys <command> [options]`. Exit codes: 0 success, 2 bad usage or bad
 * configuration, 1 runtime failure. Every error names what was wrong, where, and what to do.
 */
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { existsSync, readFileSync } from 'node:fs';
import { MatrixError } from '../matrix/errors.js';
import { parseUserId } from '../matrix/ids.js';
import { stringify as toYaml } from 'yaml';
import { ConfigError, loadConfig, maskSecrets } from '../config/load.js';
import type { Config } from '../config/schema.js';
import { createMxkeys, registerUser } from '../compose.js';
import { migrateDatabase, SchemaTooNewError } from '../storage/index.js';
import { formatSigningKeys, SigningKeyFileError, writeNewSigningKeyFile } from '../federation/signing-key-file.js';
import { generateSigningKey } from '../matrix/signing.js';
import { VERSION } from '../version.js';

export const EXIT_OK = 0;
export const EXIT_FAILURE = 1;
export const EXIT_USAGE = 2;

export interface CliIo {
  readonly stdout: (text: string) => void;
  readonly stderr: (text: string) => void;
  readonly env: Readonly<Record<string, string | undefined>>;
  /** Resolves when the process is asked to stop (SIGTERM/SIGINT); `serve` waits on it. */
  readonly stopSignal: () => Promise<string>;
  /** Calls `handler` when the process is asked to reload (SIGHUP). */
  readonly onReload?: (handler: () => void) => void;
}

class UsageError extends Error {}

type Options = NonNullable<ParseArgsConfig['options']>;

interface Command {
  readonly summary: string;
  readonly usage: string;
  readonly options: Options;
  run(values: Record<string, string | boolean | undefined>, io: CliIo): Promise<number>;
}

const configOption = { config: { type: 'string', short: 'c' } } as const satisfies Options;

function configFrom(values: Record<string, unknown>, io: CliIo, required: boolean): Readonly<Config> {
  const file = (values['config'] as string | undefined) ?? io.env['MXKEYS_CONFIG'];
  if (required && file === undefined) throw new UsageError('--config FILE is required (or set MXKEYS_CONFIG)');
  return loadConfig({ file, env: io.env });
}

const commands: Record<string, Command> = {
  serve: {
    summary: 'run the server',
    usage: `mxkeys serve [--config FILE]

Runs mxkeys until SIGTERM or SIGINT, then lets in-flight requests finish and closes the database.
Without --config (or MXKEYS_CONFIG) it serves "localhost" on 127.0.0.1:8008 with SQLite and a
signing key under ./data. MXKEYS_* environment variables override the file (docs/configuration.md).`,
    options: configOption,
    async run(values, io) {
      const config = configFrom(values, io, false);
      const mx = await createMxkeys(config);
      let url: string;
      try {
        url = await mx.listen();
      } catch (e) {
        await mx.close().catch(() => undefined);
        const code = (e as NodeJS.ErrnoException).code;
        if (code === 'EADDRINUSE' || code === 'EACCES' || code === 'EADDRNOTAVAIL') {
          throw new Error(`cannot listen on ${config.listen.host}:${config.listen.port} (${code}); set listen.host/listen.port to a free address, or stop whatever uses it`);
        }
        throw e;
      }
      mx.logger.info({ url, server_name: config.server_name, database: config.database.postgres ? 'postgres' : 'sqlite', version: VERSION }, 'mxkeys is listening');
      io.onReload?.(() => {
        if (config.tls_certificate_path === undefined) return;
        try {
          mx.reloadTls();
          mx.logger.info({ certificate: config.tls_certificate_path }, 'reloaded the TLS certificate and key');
        } catch (e) {
          mx.logger.error({ reason: (e as Error).message }, 'could not reload the TLS certificate and key; still serving the previous ones');
        }
      });
      const signal = await io.stopSignal();
      mx.logger.info({ signal }, 'shutting down: finishing in-flight requests');
      await mx.close();
      mx.logger.info('stopped');
      return EXIT_OK;
    },
  },
  'generate-key': {
    summary: 'write a new server signing key file',
    usage: `mxkeys generate-key [--out FILE]

Writes a new ed25519 signing key in Synapse's key file format ("ed25519 <version> <seed>") to FILE
(mode 0600; an existing file is never overwritten), or to standard output without --out.`,
    options: { out: { type: 'string', short: 'o' } },
    async run(values, io) {
      const out = values['out'] as string | undefined;
      if (out === undefined) {
        io.stdout(formatSigningKeys([generateSigningKey()]));
        return EXIT_OK;
      }
      if (existsSync(out)) throw new UsageError(`--out ${out} already exists; refusing to overwrite a signing key (choose another path)`);
      const key = writeNewSigningKeyFile(out);
      io.stderr(`wrote signing key ${key.keyId} to ${out}\n`);
      return EXIT_OK;
    },
  },
  'check-config': {
    summary: 'validate a configuration and print it with defaults filled in',
    usage: `mxkeys check-config --config FILE

Validates FILE together with MXKEYS_* environment variables and prints the effective configuration
as YAML, secrets masked. Exits 2 with a message naming the key when something is wrong.`,
    options: configOption,
    async run(values, io) {
      const config = configFrom(values, io, true);
      io.stdout(toYaml(maskSecrets(config)));
      return EXIT_OK;
    },
  },
  migrate: {
    summary: 'apply database migrations and exit',
    usage: `mxkeys migrate --config FILE

Brings the configured database to the schema this version of mxkeys uses. "serve" does the same on
start; run this to upgrade ahead of a deployment. Safe to run while other mxkeys processes run.`,
    options: configOption,
    async run(values, io) {
      const config = configFrom(values, io, true);
      const result = await migrateDatabase(config.database);
      const names = result.applied.map((m) => `  ${m.version}: ${m.name}`).join('\n');
      io.stdout(
        result.applied.length === 0
          ? `database is up to date at schema version ${result.to}\n`
          : `migrated the database from schema version ${result.from} to ${result.to}:\n${names}\n`,
      );
      return EXIT_OK;
    },
  },
};

commands['register-user'] = {
  summary: 'create a user account in the configured database',
  usage: `mxkeys register-user --config FILE --user NAME (--password P | --password-file F) [--admin]

Creates @NAME:<server_name> directly in the database (a running server sees it at once). NAME is a
localpart (a-z, 0-9 and . _ = - / +). --password-file - reads the password from standard input;
a trailing newline is ignored. Prints the new user ID.`,
  options: {
    ...configOption,
    user: { type: 'string', short: 'u' },
    password: { type: 'string', short: 'p' },
    'password-file': { type: 'string' },
    admin: { type: 'boolean' },
  },
  async run(values, io) {
    const user = values['user'] as string | undefined;
    if (user === undefined) throw new UsageError('--user NAME is required');
    const password = values['password'] as string | undefined;
    const file = values['password-file'] as string | undefined;
    if ((password === undefined) === (file === undefined)) throw new UsageError('give exactly one of --password P or --password-file F');
    let secret = password;
    if (file !== undefined) {
      try {
        secret = readFileSync(file === '-' ? 0 : file, 'utf8').replace(/\r?\n$/, '');
      } catch (e) {
        throw new UsageError(`cannot read --password-file ${file}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
      }
    }
    if (!secret) throw new UsageError('the password is empty');
    const config = configFrom(values, io, true);
    let localpart = user;
    if (user.startsWith('@')) {
      const parts = parseUserId(user);
      if (!parts || parts.serverName !== config.server_name) throw new UsageError(`--user ${user} is not a user of this server (${config.server_name}); give just the localpart`);
      localpart = parts.localpart;
    }
    try {
      const userId = await registerUser(config, localpart, secret, values['admin'] === true);
      io.stdout(`${userId}\n`);
      return EXIT_OK;
    } catch (e) {
      if (e instanceof MatrixError) throw new UsageError(e.message);
      throw e;
    }
  },
};

function mainUsage(): string {
  const width = Math.max(...Object.keys(commands).map((c) => c.length));
  const list = Object.entries(commands)
    .map(([name, c]) => `  ${name.padEnd(width)}  ${c.summary}`)
    .join('\n');
  return `mxkeys ${VERSION}: a Matrix end-to-end-encryption key server

Usage: mxkeys <command> [options]

Commands:
${list}

Run "mxkeys <command> --help" for a command's options.
`;
}

export async function run(argv: readonly string[], io: CliIo): Promise<number> {
  const [name, ...rest] = argv;
  if (name === undefined || name === '--help' || name === '-h' || name === 'help') {
    (name === undefined ? io.stderr : io.stdout)(mainUsage());
    return name === undefined ? EXIT_USAGE : EXIT_OK;
  }
  if (name === '--version' || name === '-V') {
    io.stdout(`${VERSION}\n`);
    return EXIT_OK;
  }
  const command = commands[name];
  if (!command) {
    io.stderr(`mxkeys: unknown command "${name}"\n\n${mainUsage()}`);
    return EXIT_USAGE;
  }
  let values: Record<string, string | boolean | undefined>;
  try {
    const parsed = parseArgs({ args: [...rest], options: { ...command.options, help: { type: 'boolean', short: 'h' } }, strict: true, allowPositionals: false });
    values = parsed.values as Record<string, string | boolean | undefined>;
  } catch (e) {
    io.stderr(`mxkeys ${name}: ${(e as Error).message}\n\nUsage: ${command.usage}\n`);
    return EXIT_USAGE;
  }
  if (values['help']) {
    io.stdout(`Usage: ${command.usage}\n`);
    return EXIT_OK;
  }
  try {
    return await command.run(values, io);
  } catch (e) {
    if (e instanceof UsageError) {
      io.stderr(`mxkeys ${name}: ${e.message}\n\nUsage: ${command.usage}\n`);
      return EXIT_USAGE;
    }
    if (e instanceof ConfigError || e instanceof SigningKeyFileError) {
      io.stderr(`mxkeys ${name}: configuration error: ${e.message}\n`);
      return EXIT_USAGE;
    }
    const message = e instanceof SchemaTooNewError ? e.message : ((e as Error).message ?? String(e));
    io.stderr(`mxkeys ${name}: ${message}\n`);
    return EXIT_FAILURE;
  }
}

/** Runs the CLI as a process: the only place that calls process.exit. */
export async function main(argv: readonly string[]): Promise<never> {
  const io: CliIo = {
    stdout: (t) => process.stdout.write(t),
    stderr: (t) => process.stderr.write(t),
    env: process.env,
    stopSignal: () =>
      new Promise((resolve) => {
        const onSignal = (signal: NodeJS.Signals) => {
          // A second signal while draining stops at once.
          const force = () => process.exit(EXIT_FAILURE);
          process.once('SIGTERM', force);
          process.once('SIGINT', force);
          resolve(signal);
        };
        process.once('SIGTERM', onSignal);
        process.once('SIGINT', onSignal);
      }),
    onReload: (handler) => process.on('SIGHUP', handler),
  };
  // A reader that goes away (e.g. `| head`) must not keep us from shutting down.
  process.stdout.on('error', () => undefined);
  process.stderr.on('error', () => undefined);
  const code = await run(argv, io);
  // Writes to pipes and files are synchronous on Linux, so nothing is lost by exiting now.
  process.exit(code);
}

