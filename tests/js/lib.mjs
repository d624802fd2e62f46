// Shared helpers for the scenario scripts that tests/test_server_js.py runs under Node.
// Each script prints one JSON summary line on stdout; pytest asserts on it.
import {
  AuthenticationError,
  CommandExitError,
  FileNotFoundError,
  InvalidArgumentError,
  NotFoundError,
  RateLimitError,
  SandboxError,
  SandboxNotFoundError,
  TimeoutError,
} from 'e2b'

// Most specific first: the first class an error is an instance of names its kind.
const KINDS = [
  ['CommandExitError', CommandExitError],
  ['AuthenticationError', AuthenticationError],
  ['SandboxNotFoundError', SandboxNotFoundError],
  ['FileNotFoundError', FileNotFoundError],
  ['NotFoundError', NotFoundError],
  ['TimeoutError', TimeoutError],
  ['InvalidArgumentError', InvalidArgumentError],
  ['RateLimitError', RateLimitError],
  ['SandboxError', SandboxError],
  ['Error', Error],
]

export function kind(err) {
  for (const [name, cls] of KINDS) if (err instanceof cls) return name
  return typeof err
}

/** Runs ``fn``; null when it resolves, else the error's kind and message. */
export async function caught(fn) {
  try {
    await fn()
    return null
  } catch (err) {
    return { kind: kind(err), message: String(err?.message ?? err) }
  }
}

export const env = (name) => {
  const v = process.env[name]
  if (!v) throw new Error(`${name} is not set`)
  return v
}

/** Prints ``await fn()`` as the one JSON line, or ``{fatal}`` and exit status 1, then exits:
 * @e2b/code-interpreter 2.8's runCode leaves its 60 s request timer armed when the server
 * answers an error (a 404 context), which would hold Node's loop open for a minute.
 * (stdout to a pipe is synchronous on Linux, so the line is out before the exit.) */
export function main(fn) {
  fn().then(
    (out) => {
      process.stdout.write(JSON.stringify(out) + '\n')
      process.exit(0)
    },
    (err) => {
      const fatal = { kind: kind(err), message: String(err?.message ?? err), stack: String(err?.stack ?? '') }
      process.stdout.write(JSON.stringify({ fatal }) + '\n')
      process.exit(1)
    },
  )
}
