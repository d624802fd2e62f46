// moat's JavaScript code context: one persistent V8 context running user code (issue 10).
//
// The agent's kernel protocol, as moat.agent.kernel speaks it: frames on the control pipes
// (fds on argv) -- u32 BE total length, u32 BE header length, a JSON header
// {"t": type, "i": id, "f": fields}, a raw payload -- EXEC in; RESULT, ERROR and DONE out.
// fds 1 and 2 are the output pipes the agent streams to the host. Runs inside the sandbox
// with the sandbox user's limits (started by the agent like the Python kernel); nothing here
// is trusted by the host: every frame it writes is validated there (moat.protocol).
//
// Cells share one vm context: top-level declarations persist (as in Node's REPL), the cell's
// completion value is its result, a returned promise is awaited, TypeScript is stripped
// first where this Node can (module.stripTypeScriptTypes, Node >= 22.13).
"use strict";

const fs = require("fs");
const util = require("util");
const vm = require("vm");
const nodeModule = require("module");
const { Writable } = require("stream");

const ctlIn = Number(process.argv[2]);
const ctlOut = Number(process.argv[3]);
const language = process.argv[4] || "js";
const MAX_TEXT = 384 * 1024;

function send(type, id, fields) {
  const header = Buffer.from(JSON.stringify({ t: type, i: id, f: fields }), "utf8");
  const head = Buffer.alloc(8);
  head.writeUInt32BE(4 + header.length, 0);
  head.writeUInt32BE(header.length, 4);
  const data = Buffer.concat([head, header]);
  let off = 0;
  while (off < data.length) {
    try {
      off += fs.writeSync(ctlOut, data, off);
    } catch (e) {
      if (e.code !== "EAGAIN") process.exit(1);
    }
  }
}

// The user's console writes to fds 1 and 2 synchronously, so output is on its pipe before
// the cell's DONE (the agent drains the pipes when it sees DONE).
function writer(fd) {
  return (text) => {
    try {
      fs.writeSync(fd, text + "\n");
    } catch (e) {
      // a closed pipe: the agent is going away
    }
  };
}
function sink(fd) {
  return new Writable({
    write(chunk, encoding, callback) {
      try {
        fs.writeSync(fd, chunk);
      } catch (e) {
        // a closed pipe: the agent is going away
      }
      callback();
    },
  });
}
const userConsole = new console.Console({ stdout: sink(1), stderr: sink(2), colorMode: false });

const sandbox = {
  console: userConsole,
  require: nodeModule.createRequire(process.cwd() + "/"),
  process,
  Buffer,
  setTimeout, clearTimeout, setInterval, clearInterval, setImmediate, clearImmediate,
  queueMicrotask, structuredClone, URL, URLSearchParams, TextEncoder, TextDecoder,
  fetch: globalThis.fetch, AbortController,
};
sandbox.globalThis = sandbox;
const context = vm.createContext(sandbox);
// Math.random from the OS's CSPRNG: two sandboxes restored from one snapshot never share it
// (V8's own generator state would be copied with the memory and has no reseed).
{
  const crypto = require("crypto");
  const buf = new Uint32Array(2);
  vm.runInContext("Math", context).random = () => {
    crypto.randomFillSync(buf);
    return ((buf[0] >>> 5) * 2 ** 26 + (buf[1] >>> 6)) / 2 ** 53; // 53 bits in [0, 1)
  };
}

function strip(code) {
  if (language !== "ts") return code;
  if (typeof nodeModule.stripTypeScriptTypes !== "function") {
    const err = new Error(
      "TypeScript needs Node >= 22.13 in the sandbox's template (this one has " +
        process.version + ")",
    );
    err.name = "UnsupportedError";
    throw err;
  }
  return nodeModule.stripTypeScriptTypes(code, { mode: "transform" });
}

function formatResult(value) {
  const data = {};
  if (typeof value === "string") {
    data.text = value;
  } else {
    data.text = util.inspect(value, { depth: 4, colors: false, maxStringLength: MAX_TEXT });
    if (value !== null && typeof value === "object") {
      try {
        const json = JSON.parse(JSON.stringify(value));
        if (json !== undefined && JSON.stringify(json).length < MAX_TEXT) data.json = json;
      } catch (e) {
        // not JSON-able (cycles, BigInt): text only
      }
    }
  }
  if (data.text.length > MAX_TEXT) {
    data.text = data.text.slice(0, MAX_TEXT) + "\n[moat: result too large, truncated]";
  }
  return data;
}

function formatError(err) {
  if (err === null || (typeof err !== "object" && typeof err !== "function")) {
    return { name: "Error", value: String(err).slice(0, 60000), traceback: "Uncaught " + String(err) };
  }
  const name = String(err.name || "Error").slice(0, 200);
  const value = String(err.message === undefined ? err : err.message).slice(0, 60000);
  // The user's frames only (those in the cell); node's own and this kernel's are dropped.
  const frames = String(err.stack || "")
    .split("\n")
    .filter((line) => /^\s+at /.test(line) && line.includes("<cell>"));
  const stack = [`${name}: ${value}`, ...frames].join("\n");
  return { name, value, traceback: stack.slice(-250000) };
}

let running = false;
const queue = [];

async function execute(id, code, envs) {
  const saved = {};
  for (const [k, v] of Object.entries(envs || {})) {
    saved[k] = process.env[k];
    process.env[k] = v;
  }
  try {
    const script = new vm.Script(strip(code), { filename: "<cell>" });
    let value = script.runInContext(context, { breakOnSigint: true });
    if (value !== null && typeof value === "object" && typeof value.then === "function") {
      value = await value;
    }
    if (value !== undefined) {
      sandbox._ = value;
      send("result", id, { data: formatResult(value), is_main: true });
    }
  } catch (err) {
    send("error", id, formatError(err));
  } finally {
    for (const [k, v] of Object.entries(saved)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  }
  send("done", id, {});
}

async function drain() {
  if (running) return;
  running = true;
  while (queue.length) {
    const frame = queue.shift();
    await execute(frame.i, frame.f.code, frame.f.envs);
  }
  running = false;
}

// An interrupt (SIGINT from the agent) ends a synchronous cell through breakOnSigint; one
// between cells is ignored, as in the Python kernel.
process.on("SIGINT", () => {});
// The agent's reseed after a restore or fork (SIGUSR2): V8's Math.random cannot be
// reseeded, so the context's Math.random draws from the kernel's CSPRNG instead (reseeded
// with the guest); nothing else to do here -- but the signal must not end the kernel.
process.on("SIGUSR2", () => {});
// A rejection or exception user code leaves behind after its cell must not end the context.
process.on("unhandledRejection", (err) => writer(2)("Unhandled rejection: " + formatError(err).traceback));
process.on("uncaughtException", (err) => writer(2)("Uncaught exception: " + formatError(err).traceback));

let buf = Buffer.alloc(0);
const input = fs.createReadStream(null, { fd: ctlIn, highWaterMark: 1 << 16 });
input.on("data", (chunk) => {
  buf = Buffer.concat([buf, chunk]);
  while (buf.length >= 8) {
    const total = buf.readUInt32BE(0);
    if (buf.length < 4 + total) break;
    const hlen = buf.readUInt32BE(4);
    const header = JSON.parse(buf.subarray(8, 8 + hlen).toString("utf8"));
    buf = buf.subarray(4 + total);
    if (header.t === "exec") queue.push(header);
  }
  drain();
});
input.on("end", () => process.exit(0));
input.on("error", () => process.exit(0));
