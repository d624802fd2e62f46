// Authentication failures, and tenant B against tenant A's sandbox (argv[2], made by the Python
// SDK with a canary file in it; argv[3] its access token, for the positive control): every call
// answers as for an unknown id, and pytest checks from outside that A's sandbox is intact.
import { Sandbox as CodeSandbox } from '@e2b/code-interpreter'
import { Sandbox } from 'e2b'
import { caught, env, main } from './lib.mjs'

/** What tenant B gets for each call against sandbox ``sid``. */
async function probe(sid, keyB, bSandbox) {
  const apiKey = keyB
  const r = {}
  r.getInfo = await caught(() => Sandbox.getInfo(sid, { apiKey }))
  r.connect = await caught(() => Sandbox.connect(sid, { apiKey }))
  r.kill = await Sandbox.kill(sid, { apiKey })
  r.setTimeout = await caught(() => Sandbox.setTimeout(sid, 5_000, { apiKey }))
  r.listed = (await Sandbox.list({ apiKey }).nextItems()).some((s) => s.sandboxId === sid)
  // A handle forged with B's own credentials and A's id: the sandbox plane must refuse it too.
  const forged = new CodeSandbox({
    sandboxId: sid,
    envdVersion: bSandbox.envdVersion,
    envdAccessToken: bSandbox.envdAccessToken,
    trafficAccessToken: bSandbox.trafficAccessToken,
    apiKey,
  })
  r.read = await caught(() => forged.files.read('/home/user/canary.txt'))
  r.write = await caught(() => forged.files.write('/home/user/forged.txt', 'from b'))
  r.list = await caught(() => forged.files.list('/home/user'))
  r.remove = await caught(() => forged.files.remove('/home/user/canary.txt'))
  r.command = await caught(() => forged.commands.run('touch /home/user/forged-cmd'))
  r.runCode = await caught(() => forged.runCode("open('/home/user/forged-code', 'w')"))
  r.isRunning = await forged.isRunning()
  return r
}

main(async () => {
  const out = {}
  const badKey = 'e2b_' + '0'.repeat(40)
  out.badCreate = await caught(() => Sandbox.create('base', { apiKey: badKey }))
  out.badList = await caught(() => Sandbox.list({ apiKey: badKey }).nextItems())
  out.badKill = await caught(() => Sandbox.kill(process.argv[2], { apiKey: badKey }))

  const keyB = env('MOAT_KEY_B')
  const b = await CodeSandbox.create({ apiKey: keyB, timeoutMs: 120_000 })
  try {
    const bSandbox = { envdVersion: (await b.getInfo()).envdVersion, envdAccessToken: b.envdAccessToken, trafficAccessToken: b.trafficAccessToken }
    out.bTokenWorks = (await b.runCode('1 + 1')).text // positive control: B's token opens B
    // Control: the same forged construction with A's own key and token reads A's canary.
    const owner = new CodeSandbox({ sandboxId: process.argv[2], envdVersion: bSandbox.envdVersion, envdAccessToken: process.argv[3], apiKey: env('MOAT_KEY_A') })
    out.ownerRead = await owner.files.read('/home/user/canary.txt')
    out.a = await probe(process.argv[2], keyB, bSandbox)
    out.unknownId = 'sbx-' + '0'.repeat(16)
    out.unknown = await probe(out.unknownId, keyB, bSandbox)
  } finally {
    await b.kill()
  }
  return out
})
