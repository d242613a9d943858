/**
 * The layering rules of docs/STYLE (../shared/guide/STYLE.md, "Who may import whom"), checked on
 * every `npm test`.
 */
module.exports = {
  forbidden: [
    {
      name: 'matrix-is-self-contained',
      comment: 'src/matrix holds spec primitives and imports only node builtins.',
      severity: 'error',
      from: { path: '^src/matrix/' },
      to: { pathNot: '^src/matrix/', dependencyTypesNot: ['core'] },
    },
    {
      name: 'rules-stay-out-of-transport-and-drivers',
      comment: 'keys/, accounts/, backup/ and todevice/ hold the rules: no Fastify, no HTTP client, no database driver, no storage implementation.',
      severity: 'error',
      from: { path: '^src/(keys|accounts|backup|todevice)/' },
      to: {
        path: ['^src/(http|federation|cli|storage/(sqlite|postgres))/', '^src/storage/(?!store\\.ts$)', '(^|/)node_modules/(fastify|pg|better-sqlite3|undici)/'],
      },
    },
    {
      name: 'drivers-only-in-storage',
      comment: 'storage/ is the only place a database driver is imported.',
      severity: 'error',
      from: { pathNot: '^src/storage/' },
      to: { path: `(^|/)node_modules/(better-sqlite3|pg)/` },
    },
    {
      name: 'http-is-thin',
      comment: 'http/ handlers parse, call the domain and shape the reply: no SQL, no storage implementation.',
      severity: 'error',
      from: { path: '^src/http/' },
      to: { path: ['^src/storage/(sqlite|postgres)/', '^src/storage/sql\\.ts$', '^src/cli/', '^src/compose\\.ts$'] },
    },
    {
      name: 'only-compose-wires',
      comment: 'Only the entry points (CLI, main.ts, the library index.ts) may import compose.ts.',
      severity: 'error',
      from: { pathNot: '^src/(cli/|main\\.ts$|index\\.ts$)' },
      to: { path: '^src/compose\\.ts$' },
    },
    {
      name: 'no-circular',
      severity: 'error',
      from: {},
      to: { circular: true },
    },
  ],
  options: {
    doNotFollow: { path: 'node_modules' },
    tsPreCompilationDeps: true,
    tsConfig: { fileName: 'tsconfig.json' },
    enhancedResolveOptions: { exportsFields: ['exports'], conditionNames: ['import', 'require', 'node', 'default', 'types'], extensions: ['.ts', '.js'] },
  },
};
