// Code interpreter: runCode with text, multi-format results and errors; contexts.
import { Sandbox } from '@e2b/code-interpreter'
import { caught, env, main } from './lib.mjs'

main(async () => {
  const sbx = await Sandbox.create({ apiKey: env('MOAT_KEY_A') })
  try {
    const out = { sandboxId: sbx.sandboxId, template: (await sbx.getInfo()).templateId }
    const seen = []
    const ex = await sbx.runCode(
      "import sys\nprint('to out')\nprint('to err', file=sys.stderr)\nx = 6\nx * 7",
      { onStdout: (m) => seen.push(m.line) },
    )
    out.text = ex.text
    out.logs = ex.logs
    out.onStdout = seen
    out.executionCount = ex.executionCount
    out.kept = (await sbx.runCode('x')).text
    const multi = await sbx.runCode(
      "class M:\n    def _repr_html_(self): return '<b>hi</b>'\n" +
        "    def _repr_markdown_(self): return '**hi**'\n    def __repr__(self): return 'M()'\nM()",
    )
    const r = multi.results[0]
    out.multi = { formats: r.formats(), html: r.html, markdown: r.markdown, text: r.text, isMain: r.isMainResult }
    const plot = await sbx.runCode(
      "import matplotlib\nmatplotlib.use('agg')\nimport matplotlib.pyplot as plt\nplt.plot([1, 2])\nplt.show()",
    )
    const p = plot.results[0]
    out.plot = { count: plot.results.length, formats: p?.formats(), pngHead: p?.png?.slice(0, 12), isMain: p?.isMainResult }
    const err = await sbx.runCode("raise ValueError('bad value')")
    out.error = err.error && { name: err.error.name, value: err.error.value, traceback: err.error.traceback }
    out.envs = (await sbx.runCode("import os; os.environ['FOO']", { envs: { FOO: 'bar' } })).text

    // timeoutMs aborts the fetch; the server must interrupt the cell when the client leaves:
    // the next cell then runs at once (one kernel per context), and the marker never appears.
    const started = Date.now()
    out.interrupt = await caught(() =>
      sbx.runCode("import time\nfor i in range(60): time.sleep(0.5)\nopen('/tmp/js-cell-marker', 'w')", { timeoutMs: 1500 }),
    )
    out.interrupt.next = (await sbx.runCode('1 + 1', { timeoutMs: 20_000 })).text
    out.interrupt.elapsedMs = Date.now() - started
    await new Promise((r) => setTimeout(r, 1000))
    out.interrupt.marker = (await sbx.runCode("import os; os.path.exists('/tmp/js-cell-marker')")).text

    // Contexts: a python one with its own cwd and state, a bash one.
    const py = await sbx.createCodeContext({ language: 'python', cwd: '/tmp' })
    const sh = await sbx.createCodeContext({ language: 'bash' })
    out.ctx = { py: py.language, pyCwd: py.cwd, sh: sh.language }
    out.ctxCwd = (await sbx.runCode('import os; os.getcwd()', { context: py })).text
    await sbx.runCode("y = 'only here'", { context: py })
    out.ctxKept = (await sbx.runCode('y', { context: py })).text
    out.defaultHasY = (await sbx.runCode("'y' in globals()")).text
    out.bash = (await sbx.runCode('echo bash $((2+3))', { context: sh })).logs.stdout
    out.listed = (await sbx.listCodeContexts()).map((c) => c.id).filter((id) => id === py.id || id === sh.id).length
    await sbx.restartCodeContext(py)
    out.afterRestart = (await sbx.runCode("'y' in globals()", { context: py })).text
    await sbx.removeCodeContext(sh.id)
    out.afterRemoveListed = (await sbx.listCodeContexts()).some((c) => c.id === sh.id)
    out.removedRun = await caught(() => sbx.runCode('echo gone', { context: sh }))
    return out
  } finally {
    await sbx.kill()
  }
})
