# mxkeys container image (docs/operations.md, "Running in a container").
#
#   docker build -t mxkeys .
#   docker run -d --name mxkeys -p 8008:8008 -v mxkeys-data:/var/lib/mxkeys/data \
#     -e MXKEYS_SERVER_NAME=example.org mxkeys
#
# Data (SQLite database, signing key) lives in the volume /var/lib/mxkeys/data: mxkeys runs in
# /var/lib/mxkeys, so the default paths ./data/mxkeys.db and ./data/signing.key land there.
# Configure with MXKEYS_* variables, or mount a file and set MXKEYS_CONFIG.

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
ENV NODE_ENV=production \
    MXKEYS_LISTEN_HOST=0.0.0.0 \
    MXKEYS_LISTEN_PORT=8008
WORKDIR /opt/mxkeys
COPY --from=build /src/package.json ./
COPY --from=build /src/node_modules node_modules
COPY --from=build /src/dist dist
# The data directory exists and belongs to the unprivileged "node" user (uid 1000), so the first
# start may create the signing key there.
RUN mkdir -p /var/lib/mxkeys/data && chown -R node:node /var/lib/mxkeys
USER node
WORKDIR /var/lib/mxkeys
VOLUME ["/var/lib/mxkeys/data"]
EXPOSE 8008
# GET /health: 200 while the database answers.
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:' + (process.env.MXKEYS_LISTEN_PORT || 8008) + '/health').then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))"]
STOPSIGNAL SIGTERM
# node itself, not npm: SIGTERM reaches mxkeys (which handles it, as PID 1 must), drains and exits.
ENTRYPOINT ["node", "/opt/mxkeys/dist/main.js"]
CMD ["serve"]
