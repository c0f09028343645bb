/**
 * Named errors with stable codes. Every error that crosses a boundary (CLI, API, wire) is one of these,
 * so callers branch on `code`, never on message text.
 */
export class WeftError extends Error {
  static override readonly name: string = "WeftError";
  constructor(
    readonly code: string,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
    this.name = (this.constructor as typeof WeftError).name;
  }
}

/** Remote input that does not decode or validate: counted and dropped, never a crash. */
export class ProtocolError extends WeftError {
  static override readonly name = "ProtocolError";
  constructor(code: "ERR_MALFORMED" | "ERR_TOO_LARGE" | "ERR_UNKNOWN_TYPE" | "ERR_VERSION" | "ERR_INVALID", message: string, options?: { cause?: unknown }) {
    super(code, message, options);
  }
}

/** Identity / authentication failures (bad signature, wrong token proof, id not derived from key). */
export class AuthError extends WeftError {
  static override readonly name = "AuthError";
  constructor(code: "ERR_BAD_TOKEN" | "ERR_BAD_SIGNATURE" | "ERR_ID_MISMATCH" | "ERR_FINGERPRINT" | "ERR_DUPLICATE_ID", message: string) {
    super(code, message);
  }
}

/** Bad operator input: flags, config files. Printed as one line by the CLI. */
export class UsageError extends WeftError {
  static override readonly name = "UsageError";
  constructor(message: string) {
    super("ERR_USAGE", message);
  }
}
