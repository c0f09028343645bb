// Types for scripts/test.mjs (imported by test/unit/test-setup.test.ts).
export interface Suite { name: string; script: string; root: boolean; what: string; rootWhy?: string }
export interface Tool { tool: string; pkg: string; suite: string; why: string; usedBy: string[]; check?: "static-elf" | "lib" }
export interface Env { root: boolean; apt: boolean; has(t: Tool): boolean; exists(file: string): boolean; noInstall?: boolean; bench?: boolean }
export interface Plan {
  suites: { name: string; run: boolean; why?: string }[];
  needed: Tool[];
  missing: Tool[];
  packages: string[];
  action: "run" | "install" | "stop";
  line?: string;
  message?: string;
}
export const SUITES: Suite[];
export const TOOLS: Tool[];
export function plan(env: Env, tools?: Tool[], suites?: Suite[]): Plan;
export function describeMissing(missing: Tool[]): string[];
export function which(name: string, path?: string): string | undefined;
export function isStaticElf(file: string): boolean;
export function hasTool(t: Tool): boolean;
export function failuresIn(reportPath: string): string[];
