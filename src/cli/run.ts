/**
 * The command line: `mxkeys <command> [options]`. Exit codes: 0 success, 2 bad usage or bad
 * configuration, 1 runtime failure. Every error names what was wrong, where, and what to do.
 */
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { existsSync, readFileSync } from 'node:fs';
import { setFlagsFromString } from 'node:v8';
import { MatrixError } from '../matrix/errors.js';
import { parseUserId, userIdFor } from '../matrix/ids.js';
import { stringify as toYaml } from 'yaml';
import { ConfigError, durationMs, loadConfig, maskSecrets } from '../config/load.js';
import type { Config } from '../config/schema.js';
import { administer, checkConfigFiles, createLogger, createMxkeys, registerUser } from '../compose.js';
import type { Logger } from 'pino';
import { parseWorkers, reportReady, superviseWorkers, workerSlot, workerStopSignal } from './cluster.js';
import { migrateDatabase, ServerNameMismatchError } from '../storage/index.js';
import { formatPublicKeys, formatSigningKeys, readSigningKeys, SigningKeyFileError, writeNewSigningKeyFile } from '../federation/signing-key-file.js';
import { PromptCancelled, readSecretFromTerminal } from './terminal.js';
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
  /** Asks for a secret without echoing it; undefined when standard input is not a terminal. */
  readonly readSecret?: ((prompt: string) => Promise<string>) | undefined;
}

/** Bad usage: the message, then the command's usage text; exit 2. */
class UsageError extends Error {}

/** A failure that needs no usage text: the message alone, with its exit code. */
class CommandError extends Error {
  constructor(
    message: string,
    readonly code: number = EXIT_FAILURE,
  ) {
    super(message);
  }
}

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

/** `--user NAME`: a localpart, or a full user ID of this server. */
function userArg(values: Record<string, unknown>, config: Readonly<Config>): { userId: string; localpart: string } {
  const user = values['user'] as string | undefined;
  if (user === undefined) throw new UsageError('--user NAME is required');
  if (!user.startsWith('@')) return { userId: userIdFor(user, config.server_name), localpart: user };
  const parts = parseUserId(user);
  if (!parts || parts.serverName !== config.server_name) throw new UsageError(`--user ${user} is not a user of this server (${config.server_name}); give just the localpart`);
  return { userId: user, localpart: parts.localpart };
}

const passwordOptions = {
  password: { type: 'string', short: 'p' },
  'password-file': { type: 'string' },
} as const satisfies Options;

/**
 * The password from --password, --password-file (- for standard input), or else asked for twice
 * on the terminal without echo.
 */
async function passwordArg(values: Record<string, unknown>, io: CliIo, forUser: string): Promise<string> {
  const password = values['password'] as string | undefined;
  const file = values['password-file'] as string | undefined;
  if (password !== undefined && file !== undefined) throw new UsageError('give only one of --password P and --password-file F');
  let secret = password;
  if (file !== undefined) {
    try {
      secret = readFileSync(file === '-' ? 0 : file, 'utf8').replace(/\r?\n$/, '');
    } catch (e) {
      throw new UsageError(`cannot read --password-file ${file}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
    }
  } else if (secret === undefined) {
    if (!io.readSecret) {
      throw new UsageError('standard input is not a terminal to ask for the password on: give --password-file F (or --password-file - to read it from standard input)');
    }
    secret = await io.readSecret(`Password for ${forUser}: `);
    if (secret && (await io.readSecret('Again, to confirm: ')) !== secret) throw new CommandError('the two passwords differ; nothing was changed', EXIT_USAGE);
  }
  if (!secret) throw new CommandError('the password is empty; nothing was changed', EXIT_USAGE);
  return secret;
}

/** A Matrix error from the account rules, told at the command line (no usage text). */
function commandErrorFrom(e: unknown, userId: string): unknown {
  if (!(e instanceof MatrixError)) return e;
  if (e.errcode === 'M_NOT_FOUND' && e.message === 'User not found') return new CommandError(`${userId}: there is no such user on this server`);
  return new CommandError(e.message, e.errcode === 'M_USER_IN_USE' || e.errcode === 'M_NOT_FOUND' ? EXIT_FAILURE : EXIT_USAGE);
}

/**
 * How far V8 lets the heap grow past what the last full collection kept, in percent, in a serving
 * process. V8's own choice (up to 4× on a busy server) let the garbage of large key queries hold
 * ~350 MiB where ~50 MiB was alive; at 100 (2×) the same load stays under 250 MiB for a few percent
 * more of another core spent marking (docs/benchmarks.md, "Memory"). `node --heap-growing-percent=N
 * dist/main.js serve` chooses another value; 0 is V8's own.
 */
const HEAP_GROWING_PERCENT = 100;

/** Sets HEAP_GROWING_PERCENT unless the node command line chose a value. */
function boundHeapGrowth(): void {
  if (process.execArgv.some((a) => /^--heap[-_]growing[-_]percent\b/.test(a))) return;
  setFlagsFromString(`--heap-growing-percent=${HEAP_GROWING_PERCENT}`);
}

/**
 * One serving process (`mxkeys serve`, or one worker of `--workers N`): listens, reloads the TLS
 * certificate on SIGHUP, drains and closes on the stop signal.
 */
async function serveProcess(
  config: Readonly<Config>,
  options: { logger?: Logger; clusterWorker?: boolean; stopSignal: () => Promise<string>; onReload?: ((handler: () => void) => void) | undefined },
): Promise<number> {
  boundHeapGrowth();
  const mx = await createMxkeys(config, { ...(options.logger ? { logger: options.logger } : {}), clusterWorker: options.clusterWorker ?? false });
  let url: string;
  try {
    url = await mx.listen();
  } catch (e) {
    // A ListenError names the listener that failed and the setting to change.
    await mx.close().catch(() => undefined);
    throw e;
  }
  // Listening for the stop signal before saying we listen: whoever waits for that line may stop us at once.
  const stopped = options.stopSignal();
  options.onReload?.(() => {
    if (config.tls_certificate_path === undefined) return;
    try {
      mx.reloadTls();
      mx.logger.info({ certificate: config.tls_certificate_path }, 'reloaded the TLS certificate and key');
    } catch (e) {
      mx.logger.error({ reason: (e as Error).message }, 'could not reload the TLS certificate and key; still serving the previous ones');
    }
  });
  if (options.clusterWorker) {
    mx.logger.info({ url }, 'worker is listening');
    reportReady(url);
  } else {
    mx.logger.info({ url, server_name: config.server_name, database: config.database.postgres ? 'postgres' : 'sqlite', version: VERSION }, 'mxkeys is listening');
  }
  const signal = await stopped;
  mx.logger.info({ signal }, 'shutting down: finishing in-flight requests');
  await mx.close();
  mx.logger.info('stopped');
  return EXIT_OK;
}

const commands: Record<string, Command> = {
  serve: {
    summary: 'run the server',
    usage: `mxkeys serve [--config FILE] [--workers N|auto]

Runs mxkeys until SIGTERM or SIGINT, then ends open /sync long-polls, lets in-flight requests
finish and closes the database. Without --config (or MXKEYS_CONFIG) it serves "localhost" on
127.0.0.1:8008 with SQLite and a signing key under ./data (the directory must exist). MXKEYS_*
environment variables override the file (docs/configuration.md). In production start it as
"node dist/main.js serve", not through npm or npx, so that signals reach it.

--workers N runs N worker processes sharing the listening port (auto: one per CPU core; default
1, a single process), under a supervisor that replaces a worker that dies, passes SIGHUP on,
drains them all on SIGTERM and serves their metrics together (docs/operations.md, "Several
processes").`,
    options: { ...configOption, workers: { type: 'string', short: 'w' } },
    async run(values, io) {
      const workers = parseWorkers(values['workers'] as string | undefined);
      if (workers === undefined) throw new UsageError(`--workers ${String(values['workers'])}: give a number of worker processes (1 or more) or "auto" (one per CPU core)`);
      const config = configFrom(values, io, false);
      const slot = workerSlot();
      if (slot !== undefined) {
        const logger = createLogger(config, { fields: { worker: slot, pid: process.pid } });
        // From the start: the supervisor may stop a worker that is still starting.
        const stop = workerStopSignal();
        return serveProcess(config, { logger, stopSignal: () => stop, onReload: io.onReload, clusterWorker: true });
      }
      if (workers > 1) return superviseWorkers({ config, workers, logger: createLogger(config, { fields: { pid: process.pid } }), stopSignal: io.stopSignal, onReload: io.onReload });
      return serveProcess(config, { stopSignal: io.stopSignal, onReload: io.onReload });
    },
  },
  'generate-key': {
    summary: 'write a new server signing key file',
    usage: `mxkeys generate-key [--out FILE [--print-public]]

Writes a new ed25519 signing key in Synapse's key file format ("ed25519 <version> <seed>") to FILE
(mode 0600, creating its directory; an existing file is never overwritten), or to standard output
without --out. --print-public then prints the new key's ID and public key ("ed25519:<version>
<base64>"), as "mxkeys show-key" does.`,
    options: { out: { type: 'string', short: 'o' }, 'print-public': { type: 'boolean' } },
    async run(values, io) {
      const out = values['out'] as string | undefined;
      if (out === undefined) {
        if (values['print-public']) throw new UsageError('--print-public needs --out FILE: the secret key goes to the file, the public key to standard output');
        io.stdout(formatSigningKeys([generateSigningKey()]));
        return EXIT_OK;
      }
      if (existsSync(out)) throw new UsageError(`--out ${out} already exists; refusing to overwrite a signing key (choose another path)`);
      const key = writeNewSigningKeyFile(out);
      io.stderr(`wrote signing key ${key.keyId} to ${out}\n`);
      if (values['print-public']) io.stdout(formatPublicKeys([key]));
      return EXIT_OK;
    },
  },
  'show-key': {
    summary: "print the key IDs and public keys of a signing key file",
    usage: `mxkeys show-key [--key FILE | --config FILE]

Prints one line per key in the signing key file: its key ID and unpadded base64 public key
("ed25519:a_XyZ1 l8Hft5…"), what other servers see, and what old_signing_keys needs when the key
is retired. The file is --key FILE, or the configuration's signing_key_path.`,
    options: { ...configOption, key: { type: 'string', short: 'k' } },
    async run(values, io) {
      const file = (values['key'] as string | undefined) ?? configFrom(values, io, false).signing_key_path;
      io.stdout(formatPublicKeys(readSigningKeys(file)));
      return EXIT_OK;
    },
  },
  'check-config': {
    summary: 'validate a configuration and print it with defaults filled in',
    usage: `mxkeys check-config --config FILE

Validates FILE together with MXKEYS_* environment variables, checks the files it names (the
signing key, federation.tls_ca_file, the SQLite database's directory), and prints the effective
configuration as YAML, secrets masked. Exits 2 with a message naming the key when something is
wrong.`,
    options: configOption,
    async run(values, io) {
      const config = configFrom(values, io, true);
      const { problems, notes } = checkConfigFiles(config);
      if (problems.length > 0) throw new CommandError(`configuration error:\n${problems.map((p) => `  ${p}`).join('\n')}`, EXIT_USAGE);
      io.stdout(toYaml(maskSecrets(config)));
      for (const note of notes) io.stderr(`note: ${note}\n`);
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
      const result = await migrateDatabase(config.database, { connectTimeoutMs: durationMs(config.database.connect_timeout) });
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
  usage: `mxkeys register-user --config FILE --user NAME [--password-file F | --password P] [--admin]

Creates @NAME:<server_name> directly in the database (a running server sees it at once). NAME is a
localpart (a-z, 0-9 and . _ = - / +). Without --password-file or --password, asks for the password
on the terminal (twice, not shown). --password-file - reads it from standard input; a trailing
newline is ignored. --password shows it to anyone who can list processes. --admin makes the user
a server admin (the admin API, docs/api.md). Prints the new user ID.`,
  options: { ...configOption, user: { type: 'string', short: 'u' }, ...passwordOptions, admin: { type: 'boolean' } },
  async run(values, io) {
    if (values['user'] === undefined) throw new UsageError('--user NAME is required');
    const config = configFrom(values, io, true);
    const { userId, localpart } = userArg(values, config);
    const password = await passwordArg(values, io, userId);
    try {
      io.stdout(`${await registerUser(config, localpart, password, values['admin'] === true)}\n`);
      return EXIT_OK;
    } catch (e) {
      throw commandErrorFrom(e, userId);
    }
  },
};

commands['users list'] = {
  summary: 'list the user accounts',
  usage: `mxkeys users list --config FILE [--deactivated] [--admins]

Prints one line per user: user ID, admin or not, deactivated or not, when the account was created
and when one of its devices was last seen (UTC). --deactivated includes deactivated accounts;
--admins lists only admins. The same list as GET /_synapse/admin/v2/users.`,
  options: { ...configOption, deactivated: { type: 'boolean' }, admins: { type: 'boolean' } },
  async run(values, io) {
    const config = configFrom(values, io, true);
    const when = (ts: unknown) => (typeof ts === 'number' ? new Date(ts).toISOString().slice(0, 16).replace('T', ' ') : '-');
    const rows: string[][] = [['USER', 'ADMIN', 'DEACTIVATED', 'CREATED', 'LAST SEEN']];
    await administer(config, async (admin) => {
      for (let from: string | undefined = '0'; from !== undefined; ) {
        const page = await admin.listUsers({ from, limit: '500', deactivated: values['deactivated'] ? 'true' : 'false', ...(values['admins'] ? { admins: 'true' } : {}) });
        for (const u of page['users'] as Record<string, unknown>[]) {
          rows.push([String(u['name']), u['admin'] ? 'admin' : '-', u['deactivated'] ? 'deactivated' : '-', when(u['creation_ts']), when(u['last_seen_ts'])]);
        }
        from = page['next_token'] as string | undefined;
      }
    });
    const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
    io.stdout(rows.map((r) => r.map((cell, i) => cell.padEnd(widths[i]!)).join('  ').trimEnd()).join('\n') + '\n');
    return EXIT_OK;
  },
};

commands['users reset-password'] = {
  summary: "set a user's password",
  usage: `mxkeys users reset-password --config FILE --user NAME [--password-file F | --password P] [--keep-devices]

Sets the password of @NAME:<server_name> (asked for on the terminal without --password-file or
--password). Every device of the user is deleted with its keys and access tokens (each client
must log in again, as a new device) unless --keep-devices is given.
As POST /_synapse/admin/v1/reset_password.`,
  options: { ...configOption, user: { type: 'string', short: 'u' }, ...passwordOptions, 'keep-devices': { type: 'boolean' } },
  async run(values, io) {
    const config = configFrom(values, io, true);
    const { userId } = userArg(values, config);
    const password = await passwordArg(values, io, userId);
    try {
      await administer(config, (admin, actor) => admin.resetPassword(actor, userId, { new_password: password, logout_devices: values['keep-devices'] !== true }));
    } catch (e) {
      throw commandErrorFrom(e, userId);
    }
    io.stdout(`password of ${userId} changed${values['keep-devices'] ? '' : '; its devices are deleted and must log in again'}\n`);
    return EXIT_OK;
  },
};

commands['users deactivate'] = {
  summary: 'deactivate a user account',
  usage: `mxkeys users deactivate --config FILE --user NAME

Deactivates @NAME:<server_name>: logs out and deletes every device with its keys, deletes the
cross-signing keys, the key backups and the password, and tells the users who track the account
(it appears in "left" of their /keys/changes). The user ID stays taken.
As POST /_synapse/admin/v1/deactivate.`,
  options: { ...configOption, user: { type: 'string', short: 'u' } },
  async run(values, io) {
    const config = configFrom(values, io, true);
    const { userId } = userArg(values, config);
    try {
      await administer(config, (admin, actor) => admin.deactivate(actor, userId, {}));
    } catch (e) {
      throw commandErrorFrom(e, userId);
    }
    io.stdout(`deactivated ${userId}: its devices, keys and access tokens are deleted; the user ID stays taken\n`);
    return EXIT_OK;
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
  let [name, ...rest] = argv;
  // `mxkeys users <action>`: the action is part of the command's name.
  if (name === 'users' && rest[0] !== undefined && !rest[0].startsWith('-')) name = `users ${rest.shift()!}`;
  else if (name === 'users') {
    const help = rest[0] === '--help' || rest[0] === '-h';
    (help ? io.stdout : io.stderr)(`${help ? '' : 'mxkeys users: name an action: list, reset-password or deactivate\n\n'}${mainUsage()}`);
    return help ? EXIT_OK : EXIT_USAGE;
  }
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
    if (e instanceof CommandError) {
      io.stderr(`mxkeys ${name}: ${e.message}\n`);
      return e.code;
    }
    if (e instanceof PromptCancelled) {
      io.stderr(`mxkeys ${name}: ${e.message}\n`);
      return EXIT_FAILURE;
    }
    if (e instanceof ConfigError || e instanceof SigningKeyFileError || e instanceof ServerNameMismatchError) {
      io.stderr(`mxkeys ${name}: configuration error: ${e.message}\n`);
      return EXIT_USAGE;
    }
    io.stderr(`mxkeys ${name}: ${(e as Error).message ?? String(e)}\n`);
    return EXIT_FAILURE;
  }
}

/** Runs the CLI as a process: the only place that calls process.exit. */
export async function main(argv: readonly string[]): Promise<never> {
  // Taken at once, so that a SIGHUP (a certificate renewal hook, a log rotation) arriving while the
  // server starts is ignored instead of ending the process, Node's default.
  let reload: (() => void) | undefined;
  process.on('SIGHUP', () => reload?.());
  const io: CliIo = {
    stdout: (t) => process.stdout.write(t),
    stderr: (t) => process.stderr.write(t),
    env: process.env,
    readSecret: process.stdin.isTTY ? readSecretFromTerminal : undefined,
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
    onReload: (handler) => {
      reload = handler;
    },
  };
  // A reader that goes away (e.g. `| head`) must not keep us from shutting down.
  process.stdout.on('error', () => undefined);
  process.stderr.on('error', () => undefined);
  const code = await run(argv, io);
  // Writes to pipes and files are synchronous on Linux, so nothing is lost by exiting now.
  process.exit(code);
}

