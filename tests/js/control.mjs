// Control plane: create (base and code-interpreter-v1), getInfo, list with metadata filters and
// paging, connect, setTimeout, kill. argv[2] is a tag unique to this run.
import { Sandbox as CodeSandbox } from '@e2b/code-interpreter'
import { Sandbox } from 'e2b'
import { caught, env, main } from './lib.mjs'

const ids = (items) => items.map((s) => s.sandboxId)

main(async () => {
  const apiKey = env('MOAT_KEY_A')
  const tag = process.argv[2]
  const out = {}
  const base = await Sandbox.create('base', { apiKey, metadata: { run: tag, who: 'a b&c=d' }, timeoutMs: 60_000 })
  const ci = await CodeSandbox.create({ apiKey, metadata: { run: tag + 'x' } })
  out.ids = { base: base.sandboxId, ci: ci.sandboxId }
  const info = await base.getInfo()
  out.info = {
    templateId: info.templateId,
    ciTemplateId: (await CodeSandbox.getInfo(ci.sandboxId, { apiKey })).templateId,
    metadata: info.metadata,
    state: info.state,
    lifetimeS: (info.endAt - info.startedAt) / 1000,
  }
  out.baseEcho = (await base.commands.run('echo base')).stdout
  out.ciCode = (await ci.runCode('40 + 2')).text

  out.byTag = ids(await Sandbox.list({ apiKey, query: { metadata: { run: tag } } }).nextItems())
  out.byOddValue = ids(await Sandbox.list({ apiKey, query: { metadata: { who: 'a b&c=d' } } }).nextItems())
  out.byNothing = ids(await Sandbox.list({ apiKey, query: { metadata: { run: 'no-' + tag } } }).nextItems())
  const running = ids(await Sandbox.list({ apiKey, query: { state: ['running'] } }).nextItems())
  out.runningHasBoth = running.includes(base.sandboxId) && running.includes(ci.sandboxId)
  const pager = Sandbox.list({ apiKey, limit: 1 })
  const paged = []
  while (pager.hasNext) paged.push(...ids(await pager.nextItems()))
  out.paged = { both: paged.includes(base.sandboxId) && paged.includes(ci.sandboxId), unique: new Set(paged).size === paged.length }

  // setTimeout moves endAt (both the instance and the static form); connect only extends.
  const before = (await base.getInfo()).endAt
  await base.setTimeout(200_000)
  const later = (await base.getInfo()).endAt
  await Sandbox.setTimeout(ci.sandboxId, 250_000, { apiKey })
  const ciInfo = await ci.getInfo()
  out.timeout = { movedS: (later - before) / 1000, ciLifetimeS: (ciInfo.endAt - Date.now()) / 1000 }
  const again = await Sandbox.connect(base.sandboxId, { apiKey, timeoutMs: 10_000 })
  out.connect = {
    same: again.sandboxId === base.sandboxId,
    endAtKept: (await again.getInfo()).endAt.getTime() === later.getTime(),
    echo: (await again.commands.run('echo again')).stdout,
  }
  const ciAgain = await CodeSandbox.connect(ci.sandboxId, { apiKey })
  out.connect.code = (await ciAgain.runCode('6 * 7')).text

  // Kill: the instance (with a command running in it), then the static form on the other; a
  // second kill is false. The running command's wait() fails the way the SDK reports a dead
  // sandbox (its health probe got the 502 "was not found").
  const sleeper = await base.commands.run('sleep 60', { background: true })
  out.kill = [await base.kill(), await Sandbox.kill(ci.sandboxId, { apiKey })]
  out.killedDuringRun = await caught(() => sleeper.wait())
  out.afterKill = {
    isRunning: await base.isRunning(),
    killAgain: await Sandbox.kill(base.sandboxId, { apiKey }),
    getInfo: await caught(() => Sandbox.getInfo(base.sandboxId, { apiKey })),
    connect: await caught(() => Sandbox.connect(base.sandboxId, { apiKey })),
    setTimeout: await caught(() => Sandbox.setTimeout(base.sandboxId, 10_000, { apiKey })),
    command: await caught(() => base.commands.run('echo dead')),
    listed: ids(await Sandbox.list({ apiKey, query: { metadata: { run: tag } } }).nextItems()),
  }
  return out
})
