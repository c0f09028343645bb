/** The hub lives in the runtime-neutral core; this path stays for existing imports. */
export * from "./core/hub.js";
