// Files on a sandbox made by the Python SDK (argv[2]): read what Python wrote, write text and
// bytes, list, getInfo, exists, rename, remove, makeDir; pytest reads the results back.
import { Sandbox } from 'e2b'
import { caught, env, main } from './lib.mjs'

const entry = (e) => e && { name: e.name, type: e.type, path: e.path, size: e.size }

main(async () => {
  const sbx = await Sandbox.connect(process.argv[2], { apiKey: env('MOAT_KEY_A') })
  const fs = sbx.files
  const out = {}
  out.fromPython = await fs.read('/home/user/from-python.txt')
  const blob = new Uint8Array(25600).map((_, i) => i % 256)
  out.wroteText = await fs.write('js/a.txt', 'hello from node')
  await fs.write('/home/user/js/b.bin', blob.buffer)
  out.text = await fs.read('/home/user/js/a.txt')
  const back = await fs.read('js/b.bin', { format: 'bytes' })
  out.bytesEqual = back.length === blob.length && back.every((b, i) => b === blob[i])
  out.blobSize = (await fs.read('js/b.bin', { format: 'blob' })).size
  out.many = (await fs.write([
    { path: '/tmp/js-m1.txt', data: 'one' },
    { path: 'js/m2.txt', data: 'two' },
  ])).map((w) => w.path)
  out.list = (await fs.list('js')).map(entry).sort((a, b) => a.name.localeCompare(b.name))
  out.info = entry(await fs.getInfo('js/a.txt'))
  out.dirInfo = entry(await fs.getInfo('/home/user/js'))
  out.exists = [await fs.exists('js/a.txt'), await fs.exists('js/none.txt')]
  out.renamed = entry(await fs.rename('js/a.txt', '/home/user/js/renamed.txt'))
  out.existsAfterRename = await fs.exists('js/a.txt')
  await fs.remove('js/m2.txt')
  out.existsAfterRemove = await fs.exists('js/m2.txt')
  out.makeDir = [await fs.makeDir('js/new/deeper'), await fs.makeDir('js/new/deeper')]
  out.readMissing = await caught(() => fs.read('/home/user/missing.txt'))
  out.infoMissing = await caught(() => fs.getInfo('/home/user/missing.txt'))
  out.readDir = await caught(() => fs.read('/home/user/js'))

  // 3 MiB streamed (octet-stream, chunked, duplex half) and as one octet-stream body.
  const big = new Uint8Array(3 << 20).map((_, i) => (i * 7) % 251)
  const stream = new ReadableStream({
    start(c) {
      for (let i = 0; i < big.length; i += 65536) c.enqueue(big.subarray(i, i + 65536))
      c.close()
    },
  })
  out.streamed = {
    stream: (await fs.write('js/s.bin', stream), (await fs.getInfo('js/s.bin')).size),
    octet: (await fs.write('js/o.bin', big, { useOctetStream: true }), (await fs.getInfo('js/o.bin')).size),
  }
  let n = 0
  for await (const chunk of await fs.read('js/s.bin', { format: 'stream' })) n += chunk.length
  out.streamed.readStream = n
  return out
})
