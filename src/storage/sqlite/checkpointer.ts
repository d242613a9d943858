/**
 * WAL checkpoints off the event loop. SQLite's automatic checkpoint runs inside the COMMIT that
 * takes the WAL past 1000 pages: it copies them into the database file and fsyncs it (here ~9 ms
 * of writes and ~18 ms of fsync per 1000 pages), on the thread that committed — the event loop.
 * Here the serving connection turns that off, and a worker thread with its own connection runs a
 * PASSIVE checkpoint (one that never waits for, or holds up, readers and writers) each time the
 * WAL has grown by 1000 pages.
 *
 * SQLite starts the WAL over only in a write transaction that begins when every frame has been
 * copied back. A connection writing all the time almost never finds it so once the copying is
 * done elsewhere, so when the WAL has reached RESTART_FRAMES the serving connection copies the
 * few frames the worker's last pass left (after up to MAX_PASSES passes have brought them under
 * FINISH_FRAMES: about a millisecond), and its next write starts the WAL over.
 *
 * The worker starts at the first checkpoint, so a database that is hardly written never starts
 * one. If it fails, the serving connection goes back to checkpointing by itself.
 */
import { createRequire } from 'node:module';
import { Worker } from 'node:worker_threads';

/** SQLite's default for wal_autocheckpoint, in pages (frames): how often the worker checkpoints. */
export const CHECKPOINT_FRAMES = 1000;
/** The WAL length (frames: ~32 MB) at which the serving connection lets the WAL start over. */
const RESTART_FRAMES = 8000;
/** Frames the serving connection copies itself; beyond this the worker makes another pass first. */
const FINISH_FRAMES = 64;
const MAX_PASSES = 4;

// Plain CommonJS run in the worker (eval), so it needs neither a build step nor tsx.
const WORKER_SOURCE = `
const { parentPort, workerData } = require('node:worker_threads');
const Database = require(workerData.driver);
const db = new Database(workerData.path, { timeout: 5000 });
db.pragma('wal_autocheckpoint = 0');
const checkpoint = db.prepare('PRAGMA wal_checkpoint(PASSIVE)');
parentPort.on('message', (m) => {
  if (m === 'close') {
    db.close();
    parentPort.close();
    return;
  }
  try {
    parentPort.postMessage({ result: checkpoint.get() });
  } catch (e) {
    parentPort.postMessage({ error: String(e && e.message) });
  }
});
`;


/** What the serving connection gives the checkpointer. */
export interface CheckpointTarget {
  /** The WAL's length in frames now (the wal-index header). */
  walFrames(): number;
  /** Copies what the worker left, on the serving connection (a PASSIVE checkpoint there). */
  finish(): void;
  /** Hands checkpoints back to the serving connection for good: the worker failed. */
  checkpointItself(): void;
}

export class Checkpointer {
  private worker: Worker | undefined;
  private running = false;
  /** Passes made for the current checkpoint. */
  private passes = 0;
  /** The WAL's length when the worker was last asked. */
  private askedAt = 0;
  private stopped = false;
  /** Passes the worker completed, and checkpoints the serving connection finished (for tests). */
  passesDone = 0;
  finished = 0;

  constructor(
    private readonly path: string,
    private readonly target: CheckpointTarget,
  ) {}

  /** Called after writes: asks the worker for a pass each time the WAL has grown by CHECKPOINT_FRAMES. */
  wrote(): void {
    if (this.running || this.stopped) return;
    const frames = this.target.walFrames();
    // A WAL shorter than at the last ask has started over.
    if (frames < this.askedAt) this.askedAt = 0;
    if (frames < this.askedAt + CHECKPOINT_FRAMES) return;
    this.askedAt = frames;
    this.running = true;
    this.passes = 1;
    try {
      this.start().postMessage('checkpoint');
    } catch {
      // No worker thread here (better-sqlite3 not loadable from one, say): checkpoint as SQLite does.
      this.fail();
    }
  }

  /** A pass is done: past RESTART_FRAMES, another pass or the serving connection's finish. */
  private passed(result: { busy: number; checkpointed: number }): void {
    this.passesDone++;
    const frames = this.target.walFrames();
    if (this.stopped || result.busy !== 0 || frames < RESTART_FRAMES) return void (this.running = false);
    const left = frames - result.checkpointed;
    if (left > FINISH_FRAMES && this.passes < MAX_PASSES) {
      this.passes++;
      return void this.worker!.postMessage('checkpoint');
    }
    this.running = false;
    this.target.finish();
    this.finished++;
  }

  private start(): Worker {
    if (this.worker) return this.worker;
    const driver = createRequire(import.meta.url).resolve('better-sqlite3');
    const worker = new Worker(WORKER_SOURCE, { eval: true, execArgv: [], workerData: { path: this.path, driver } });
    worker.unref();
    worker.on('message', (m: { error?: string; result?: { busy: number; checkpointed: number } }) => {
      if (m.error !== undefined || !m.result) return this.fail();
      this.passed(m.result);
    });
    worker.on('error', () => this.fail());
    worker.on('exit', () => {
      if (!this.stopped) this.fail();
    });
    this.worker = worker;
    return worker;
  }

  private fail(): void {
    if (this.stopped) return;
    this.stopped = true;
    this.running = false;
    this.target.checkpointItself();
    void this.worker?.terminate();
  }

  /** Lets a pass under way finish, then ends the worker. */
  async close(): Promise<void> {
    this.stopped = true;
    const worker = this.worker;
    if (!worker) return;
    const exited = new Promise((resolve) => worker.once('exit', resolve));
    worker.postMessage('close');
    const timer = setTimeout(() => void worker.terminate(), 10_000);
    await exited;
    clearTimeout(timer);
  }
}
