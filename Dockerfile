# weftnet image: the agent, the signaling server and the CNI plugin, for examples/kubernetes/weftnet.yaml.
#
#   docker build -t ghcr.io/weftnet/weftnet:0.1.0 .
#   docker run --rm ghcr.io/weftnet/weftnet:0.1.0 --help
#
# NOT BUILT OR TESTED HERE: the machine this was written on has no container builder and no registry
# access beyond npm and Debian. test/unit/manifests.test.ts only checks that this file and the manifests
# agree (paths, entrypoint, image name). Build it yourself before relying on it.
#
# Stage 1 compiles TypeScript and builds the CNI plugin as a single executable (Node SEA:
# dist/cni/weftnet-cni, runs on hosts without Node.js; the init container copies it to /opt/cni/bin).
# Stage 2 keeps production dependencies only, plus the OS tools the agent drives: iproute2 (ip),
# iptables (the WEFTNET-FWD chain), ebtables (per-pod source filter on the host veth) and util-linux
# (nsenter; already in Debian's base).
# Install scripts of dependencies are not run (--ignore-scripts): none is needed (README "Dependencies").

FROM node:20-slim AS build
WORKDIR /src
COPY package.json package-lock.json ./
RUN npm ci --ignore-scripts --no-audit --no-fund
COPY tsconfig.json ./
COPY src ./src
COPY signaling ./signaling
COPY agent ./agent
COPY examples ./examples
COPY test ./test
COPY scripts ./scripts
RUN npm run build && node scripts/build-cni.mjs

FROM node:20-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends iproute2 iptables ebtables \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
ENV NODE_ENV=production
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --ignore-scripts --no-audit --no-fund && npm cache clean --force
COPY --from=build /src/dist/src /app/dist/src
COPY --from=build /src/dist/signaling /app/dist/signaling
COPY --from=build /src/dist/agent /app/dist/agent
COPY --from=build /src/dist/cni/weftnet-cni /app/dist/cni/weftnet-cni
COPY README.md ./
RUN ln -s /app/dist/agent/cli/main.js /usr/local/bin/weftnet && chmod 0755 /app/dist/agent/cli/main.js
# `weftnet agent ...` needs root (or NET_ADMIN + NET_RAW) for the data plane; `weftnet signal ...` does not
# (the manifests run it as nobody).
ENTRYPOINT ["node", "/app/dist/agent/cli/main.js"]
CMD ["--help"]
