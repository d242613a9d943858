# mxkeys container image (docs/operations.md, "Running in a container").
#
#   docker build -t mxkeys .
#   docker run -d --name mxkeys -p 8008:8008 -v mxkeys-data:/var/lib/mxkeys/data \
#     -e MXKEYS_SERVER_NAME=example.org mxkeys
#
# Data (SQLite database, signing key) lives in the volume /var/lib/mxkeys/data: mxkeys runs in
# /var/lib/mxkeys, so the default paths ./data/mxkeys.db and ./data/signing.key land there.
# The image's config file /etc/mxkeys/mxkeys.yaml only sets listen: 0.0.0.0:8008. Configure with
# MXKEYS_* variables (they override the file), or mount your own file and point MXKEYS_CONFIG at
# it (then its listen.* applies: set listen.host: 0.0.0.0 there to be reachable from outside).

# Build: dev dependencies and the TypeScript compiler, then only production dependencies kept.
FROM node:20-bookworm-slim AS build
# better-sqlite3 is compiled when no prebuilt binary can be downloaded.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 make g++ \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY package.json package-lock.json tsconfig.json tsconfig.build.json ./
COPY scripts/prepare.mjs scripts/
COPY src src
RUN npm ci && npm prune --omit=dev

# Run: node, the built server and its production dependencies; nothing else.
FROM node:20-bookworm-slim
# Listening settings live in a config file, not in MXKEYS_LISTEN_* variables: those would
# silently override the listen.* of a file mounted in its place.
ENV NODE_ENV=production \
    MXKEYS_CONFIG=/etc/mxkeys/mxkeys.yaml
WORKDIR /opt/mxkeys
COPY --from=build /src/package.json ./
COPY --from=build /src/node_modules node_modules
COPY --from=build /src/dist dist
# The data directory exists and belongs to the unprivileged "node" user (uid 1000), so the first
# start may create the signing key there.
RUN mkdir -p /var/lib/mxkeys/data && chown -R node:node /var/lib/mxkeys \
 && mkdir -p /etc/mxkeys \
 && printf '%s\n' '# mxkeys in a container: reachable on port 8008 of every interface of the container.' 'listen: { host: 0.0.0.0, port: 8008 }' > /etc/mxkeys/mxkeys.yaml
USER node
WORKDIR /var/lib/mxkeys
VOLUME ["/var/lib/mxkeys/data"]
EXPOSE 8008
# GET /health: 200 while the database answers; on the port the configuration (file and
# variables, as serve reads them) listens on.
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 \
  CMD ["node", "--input-type=module", "-e", "const { loadConfig } = await import('/opt/mxkeys/dist/config/load.js'); const { listen } = loadConfig({ file: process.env.MXKEYS_CONFIG, env: process.env }); const r = await fetch('http://127.0.0.1:' + listen.port + '/health').catch(() => undefined); process.exit(r?.ok ? 0 : 1);"]
STOPSIGNAL SIGTERM
# node itself, not npm: SIGTERM reaches mxkeys (which handles it, as PID 1 must), drains and exits.
ENTRYPOINT ["node", "/opt/mxkeys/dist/main.js"]
CMD ["serve"]
