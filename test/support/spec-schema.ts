/**
 * Validating responses against the Matrix spec's own OpenAPI files (copies of ../shared/spec/data
 * in test/fixtures/matrix-spec, so a lone clone can run the tests), with
 * every relative $ref inlined and ajv compiling the result (OpenAPI 3.1 schemas are JSON Schema
 * 2020-12).
 */
import { readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parse } from 'yaml';
import Ajv2020 from 'ajv/dist/2020.js';

/** The copies the validators read. */
export const SPEC_DATA = resolve(fileURLToPath(new URL('../fixtures/matrix-spec/data', import.meta.url)));
/** The spec extract next to the repository, when there is one (the ground truth the copies must match). */
export const SHARED_SPEC_DATA = resolve(fileURLToPath(new URL('../../../shared/spec/data', import.meta.url)));

type Json = Record<string, unknown>;

function pointer(doc: unknown, path: string): unknown {
  return path
    .split('/')
    .filter(Boolean)
    .reduce<unknown>((node, part) => (node as Json)[part.replace(/~1/g, '/').replace(/~0/g, '~')], doc);
}

const docs = new Map<string, unknown>();
function load(file: string): unknown {
  let doc = docs.get(file);
  if (doc === undefined) {
    doc = parse(readFileSync(file, 'utf8')) as unknown;
    docs.set(file, doc);
  }
  return doc;
}

/** Inlines every `$ref` (file and JSON pointer), resolving paths relative to the file they occur in. */
function inline(node: unknown, file: string): unknown {
  if (Array.isArray(node)) return node.map((n) => inline(n, file));
  if (typeof node !== 'object' || node === null) return node;
  const obj = node as Json;
  if (typeof obj['$ref'] === 'string') {
    const [target, frag] = (obj['$ref'] as string).split('#');
    const targetFile = target ? join(dirname(file), target) : file;
    const resolved = frag ? pointer(load(targetFile), frag) : load(targetFile);
    const { $ref: _ref, ...rest } = obj;
    const inlined = inline(resolved, targetFile) as Json;
    return Object.keys(rest).length ? { allOf: [inlined, inline(rest, file)] } : inlined;
  }
  return Object.fromEntries(Object.entries(obj).map(([k, v]) => [k, inline(v, file)]));
}

const ajv = new Ajv2020.default({ strict: false, allErrors: true });

/** A validator for the 200 response of `method path` in the OpenAPI file `api` (relative to data/api). */
export function responseValidator(api: string, path: string, method: string): (body: unknown) => string[] {
  const file = join(SPEC_DATA, 'api', api);
  const op = pointer(load(file), `/paths/${path.replace(/~/g, '~0').replace(/\//g, '~1')}/${method}`) as Json;
  const schema = inline(((((op['responses'] as Json)['200'] as Json)['content'] as Json)['application/json'] as Json)['schema'], file);
  const validate = ajv.compile(schema as object);
  return (body) => (validate(body) ? [] : (validate.errors ?? []).map((e) => `${e.instancePath} ${e.message ?? ''} ${JSON.stringify(e.params)}`));
}

/** A validator for the schema in `definition` (relative to data/api), e.g. an EDU's. */
export function definitionValidator(definition: string): (value: unknown) => string[] {
  const file = join(SPEC_DATA, 'api', definition);
  const validate = ajv.compile(inline(load(file), file) as object);
  return (value) => (validate(value) ? [] : (validate.errors ?? []).map((e) => `${e.instancePath} ${e.message ?? ''} ${JSON.stringify(e.params)}`));
}
