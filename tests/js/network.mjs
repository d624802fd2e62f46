// E2B's documented allow-list form, denyOut [ALL_TRAFFIC] + allowOut hosts, on create and on
// updateNetwork; each sandbox probes two hosts through moat's egress proxy and reports the
// proxy's verdict (X-Moat-Reason: not_allowed is a policy denial, no_address a host that
// passed the policy but does not resolve here).
import { ALL_TRAFFIC, Sandbox } from 'e2b'
import { caught, env, main } from './lib.mjs'

const PROBE = `import json, urllib.error, urllib.request
out = {}
for h in ('allowed.example.test', 'other.example.test'):
    try:
        r = urllib.request.urlopen('http://%s/x' % h, timeout=30)
        out[h] = [r.status, r.headers.get('X-Moat-Reason')]
    except urllib.error.HTTPError as e:
        out[h] = [e.code, e.headers.get('X-Moat-Reason')]
    except Exception as e:
        out[h] = [-1, type(e).__name__]
print(json.dumps(out))`

async function probe(sbx) {
  await sbx.files.write('/tmp/probe.py', PROBE)
  const info = await sbx.getInfo()
  const verdicts = JSON.parse((await sbx.commands.run('python3 /tmp/probe.py')).stdout)
  return { verdicts, network: info.network, allowInternetAccess: info.allowInternetAccess }
}

main(async () => {
  const apiKey = env('MOAT_KEY_A')
  const allowList = { allowOut: ['allowed.example.test'], denyOut: [ALL_TRAFFIC] }
  const out = { allTraffic: ALL_TRAFFIC }
  const open = await Sandbox.create('base', { apiKey, allowInternetAccess: true })
  const listed = await Sandbox.create('base', { apiKey, allowInternetAccess: true, network: allowList })
  try {
    out.open = await probe(open) // the control: internet access alone lets both through
    out.created = await probe(listed)
    await open.updateNetwork(allowList)
    out.updated = await probe(open)
    out.allowAll = await caught(() => Sandbox.create('base', { apiKey, network: { allowOut: [ALL_TRAFFIC] } }))
  } finally {
    await open.kill()
    await listed.kill()
  }
  return out
})
