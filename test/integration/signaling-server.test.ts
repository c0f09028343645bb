/** The signaling suite against the Node server (signaling/server.ts, in process). */
import { nodeRuntime } from "../helpers/signal-runtimes.js";
import { defineSignalingSuite } from "./signaling-suite.js";

defineSignalingSuite(nodeRuntime);
