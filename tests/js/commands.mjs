// Commands on a sandbox made by the Python SDK (argv[2]), reached with Sandbox.connect:
// foreground, exit codes, background + kill, stdin, re-attach by pid, options.
import { Sandbox } from 'e2b'
import { caught, env, kind, main } from './lib.mjs'

const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

main(async () => {
  const sbx = await Sandbox.connect(process.argv[2], { apiKey: env('MOAT_KEY_A') })
  const cmds = sbx.commands
  const out = {}
  const chunks = []
  const fg = await cmds.run('echo hello; echo oops >&2', { onStdout: (d) => chunks.push(d) })
  out.fg = { exitCode: fg.exitCode, stdout: fg.stdout, stderr: fg.stderr, onStdout: chunks.join('') }
  try {
    await cmds.run('echo partial; echo bad >&2; exit 3')
    out.exit = null
  } catch (err) {
    out.exit = { kind: kind(err), exitCode: err.exitCode, stdout: err.stdout, stderr: err.stderr }
  }
  const opts = await cmds.run('pwd; echo $FOO; whoami', { cwd: '/tmp', envs: { FOO: 'foo-value' } })
  out.opts = opts.stdout
  out.root = await cmds.run('whoami', { user: 'root' }).then((r) => r.stdout, (err) => ({ kind: kind(err), message: err.message }))
  out.timeout = await caught(() => cmds.run('sleep 30', { timeoutMs: 1000 }))

  // Background + kill: the marker it would write after 2 s must never appear (pytest checks
  // from outside); its sibling, left alone, writes the positive control.
  const doomed = await cmds.run('sleep 2; touch /tmp/js-killed-marker; sleep 600', { background: true })
  await cmds.run('sleep 2; touch /tmp/js-control-marker', { background: true })
  out.listed = (await cmds.list()).some((p) => p.pid === doomed.pid)
  out.killed = await doomed.kill()
  out.waitAfterKill = await caught(() => doomed.wait())
  out.killAgain = await cmds.kill(doomed.pid)
  out.listedAfterKill = (await cmds.list()).some((p) => p.pid === doomed.pid)

  // Stdin: through Commands.sendStdin and the handle, then EOF.
  out.supportsStdinClose = cmds.supportsStdinClose
  const cat = await cmds.run('cat', { background: true, stdin: true })
  await cmds.sendStdin(cat.pid, 'line one\n')
  await cat.sendStdin(new TextEncoder().encode('line two\n'))
  if (cmds.supportsStdinClose) await cmds.closeStdin(cat.pid)
  else await sleep(500)
  if (!cmds.supportsStdinClose) await cat.kill()
  out.stdin = await cat.wait().then((r) => r.stdout, (err) => err.stdout)

  // Re-attach: disconnect after the first line, connect(pid) again and wait for its end.
  const first = []
  const ticker = await cmds.run('for i in 1 2 3 4 5; do echo tick $i; sleep 0.3; done; exit 4', {
    background: true,
    onStdout: (d) => first.push(d),
  })
  while (first.length === 0) await sleep(50)
  await ticker.disconnect()
  const later = []
  const again = await cmds.connect(ticker.pid, { onStdout: (d) => later.push(d) })
  try {
    await again.wait()
    out.reattach = null
  } catch (err) {
    out.reattach = { kind: kind(err), exitCode: err.exitCode, pid: again.pid === ticker.pid, stdout: later.join('') }
  }
  out.connectUnknown = await caught(() => cmds.connect(999999))
  out.killUnknown = await cmds.kill(999999)
  return out
})
