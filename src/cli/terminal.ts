/**
 * Asking for a secret on the terminal without showing it: raw mode, no echo, nothing in `ps` or
 * the shell history. Backspace edits; Enter ends; Ctrl-C and Ctrl-D give up.
 */

export class PromptCancelled extends Error {
  constructor() {
    super('cancelled at the password prompt; nothing was changed');
    this.name = 'PromptCancelled';
  }
}

/** Reads one line from a terminal on standard input, echoing nothing; the prompt goes to standard error. */
export function readSecretFromTerminal(prompt: string): Promise<string> {
  const stdin = process.stdin;
  // Echo goes off before the prompt shows, so nothing typed after it can appear.
  stdin.setRawMode(true);
  process.stderr.write(prompt);
  stdin.setEncoding('utf8');
  stdin.resume();
  return new Promise((resolve, reject) => {
    let value = '';
    const finish = (outcome: () => void) => {
      stdin.off('data', onData);
      stdin.setRawMode(false);
      stdin.pause();
      process.stderr.write('\n');
      outcome();
    };
    const onData = (chunk: string) => {
      for (const ch of chunk) {
        if (ch === '\r' || ch === '\n') return finish(() => resolve(value));
        if (ch === '\u0003' || (ch === '\u0004' && value === '')) return finish(() => reject(new PromptCancelled()));
        if (ch === '\u007f' || ch === '\b') value = [...value].slice(0, -1).join('');
        else if (ch >= ' ') value += ch;
      }
    };
    stdin.on('data', onData);
  });
}
