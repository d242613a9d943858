/** Test certificates made with openssl: a CA, and leaf certificates it signs. */
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { tempDir } from './backends.js';

export interface TestCa {
  /** Path of the CA certificate (PEM). */
  readonly caPath: string;
  /** A key and certificate for `san` (e.g. "IP:127.0.0.1", "DNS:example.org"), as PEM text and as files. */
  leaf(name: string, san: string): { key: string; cert: string; keyPath: string; certPath: string };
}

export function testCa(): TestCa {
  const dir = tempDir();
  const run = (...args: string[]) => execFileSync('openssl', args, { cwd: dir, stdio: 'pipe' });
  run('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'ca.key', '-out', 'ca.pem', '-days', '2', '-subj', '/CN=mxkeys test CA');
  return {
    caPath: join(dir, 'ca.pem'),
    leaf(name, san) {
      run('req', '-newkey', 'rsa:2048', '-nodes', '-keyout', `${name}.key`, '-out', `${name}.csr`, '-subj', `/CN=${name}`);
      const ext = join(dir, `${name}.ext`);
      execFileSync('sh', ['-c', `printf 'subjectAltName=${san}\\n' > ${ext}`]);
      run('x509', '-req', '-in', `${name}.csr`, '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial', '-out', `${name}.pem`, '-days', '2', '-extfile', ext);
      const keyPath = join(dir, `${name}.key`);
      const certPath = join(dir, `${name}.pem`);
      return { key: readFileSync(keyPath, 'utf8'), cert: readFileSync(certPath, 'utf8'), keyPath, certPath };
    },
  };
}
