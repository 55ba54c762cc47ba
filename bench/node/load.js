'use strict';
// Load side of line-gateway's benchmark: a bench agent (Cartesia Calls API server) and N
// simulated Twilio calls, on one Node event loop. Driven by `python -m bench.run` over
// JSON lines (commands on stdin, replies on stdout); it never decides anything itself.
//
// Every audio frame, either way, is 160 bytes of mu-law whose first 16 bytes are (sequence
// number, CLOCK_MONOTONIC ns at send) as two little-endian u64. process.hrtime() reads
// CLOCK_MONOTONIC, the clock Python's time.monotonic_ns() reads, so latencies measured here
// and timestamps taken in Python compare.
//
// Why Node: the same engine in Python (aiohttp on uvloop) cost ~50 % of a core at 100 calls;
// this one is written to stay far below 80 % of its core at 300 calls (precomputed base64,
// only the 24 varying base64 characters are built and read per frame, one timer per sender).

const http = require('http');
const { monitorEventLoopDelay } = require('perf_hooks');
const readline = require('readline');
const { WebSocket, WebSocketServer } = require('ws');

const FRAME_MS = 20;
const FRAME_BYTES = 160;
const HEAD_CHARS = 24; // base64 of the 16 varying bytes + 2 constant ones
const CONST = Buffer.alloc(FRAME_BYTES - 16);
for (let i = 0; i < CONST.length; i++) CONST[i] = (0x55 + i) & 0xff;
const TAIL_B64 = CONST.subarray(2).toString('base64');
const HEAD = Buffer.alloc(18);
CONST.copy(HEAD, 16, 0, 2);
const TWO32 = 4294967296;

function nowNs() {
  const t = process.hrtime();
  return t[0] * 1e9 + t[1]; // exact: uptime in ns stays far below 2^53
}

function stampHead(seq) {
  const t = nowNs();
  HEAD.writeUInt32LE(seq >>> 0, 0);
  HEAD.writeUInt32LE(0, 4);
  HEAD.writeUInt32LE(t % TWO32, 8);
  HEAD.writeUInt32LE(Math.floor(t / TWO32), 12);
  return HEAD.toString('base64');
}

// -> [seq, sentNs]
function readStamp(payload) {
  const b = Buffer.from(payload.substring(0, HEAD_CHARS), 'base64');
  return [b.readUInt32LE(0), b.readUInt32LE(8) + b.readUInt32LE(12) * TWO32];
}

// Fast path for the frames that make up the load: when a frame starts with `prefix` (the
// event name as both servers write it), the stamp is read straight from the bytes after
// `"payload":"` without parsing the JSON. Anything else returns null and is parsed in full.
const PAYLOAD_KEY = Buffer.from('"payload":"');
function fastStamp(buf, prefix) {
  if (buf.length < prefix.length || buf.compare(prefix, 0, prefix.length, 0, prefix.length) !== 0) return null;
  const at = buf.indexOf(PAYLOAD_KEY, prefix.length);
  if (at < 0) return null;
  const start = at + PAYLOAD_KEY.length;
  if (buf.length < start + HEAD_CHARS) return null;
  const b = Buffer.from(buf.toString('latin1', start, start + HEAD_CHARS), 'base64');
  return [b.readUInt32LE(0), b.readUInt32LE(8) + b.readUInt32LE(12) * TWO32];
}
const MEDIA_INPUT = Buffer.from('{"event":"media_input",');
const MEDIA = Buffer.from('{"event":"media",');

class SeqCheck {
  constructor() {
    this.maxSeen = -1;
    this.missing = new Set();
    this.dup = 0;
    this.reordered = 0;
    this.received = 0;
  }
  see(seq) {
    this.received++;
    if (seq === this.maxSeen + 1) {
      this.maxSeen = seq;
    } else if (seq > this.maxSeen) {
      for (let s = this.maxSeen + 1; s < seq; s++) this.missing.add(s);
      this.maxSeen = seq;
    } else if (this.missing.has(seq)) {
      this.missing.delete(seq);
      this.reordered++;
    } else {
      this.dup++;
    }
  }
  resetWindow() {
    this.missing.clear();
    this.dup = 0;
    this.reordered = 0;
  }
}

// What one measurement window collects. Latencies in a growable Float64Array (ms).
class Samples {
  constructor() {
    this.a = new Float64Array(1 << 16);
    this.n = 0;
  }
  push(v) {
    if (this.n === this.a.length) {
      const b = new Float64Array(this.a.length * 2);
      b.set(this.a);
      this.a = b;
    }
    this.a[this.n++] = v;
  }
  stats() {
    if (this.n === 0) return { p50: null, p99: null, max: null, n: 0 };
    const s = this.a.slice(0, this.n).sort();
    const at = (q) => {
      // linear interpolation, as numpy.percentile
      const pos = (s.length - 1) * q;
      const lo = Math.floor(pos);
      const hi = Math.min(lo + 1, s.length - 1);
      return s[lo] + (s[hi] - s[lo]) * (pos - lo);
    };
    const r3 = (v) => Math.round(v * 1000) / 1000;
    return { p50: r3(at(0.5)), p99: r3(at(0.99)), max: r3(s[s.length - 1]), n: s.length };
  }
}

const win = {
  on: false,
  up: new Samples(),
  down: new Samples(),
  late: new Samples(),
  marks: 0,
  clears: 0,
  unexpected: 0,
};

// ---------------------------------------------------------------- the bench agent

const agentCalls = new Map(); // call_sid -> AgentCall
let restRequests = 0;
const agentErrors = [];

class AgentCall {
  constructor(ws, connectedNs) {
    this.ws = ws;
    this.callSid = '';
    this.connectedNs = connectedNs;
    this.startNs = 0;
    this.firstOutNs = 0;
    this.up = new SeqCheck();
    this.sent = 0;
    this.timer = null;
    this.closed = false;
  }

  onMessage(data) {
    if (!this.startNs) {
      const text = data.toString();
      let frame;
      try {
        frame = JSON.parse(text);
      } catch (e) {
        frame = {};
      }
      if (frame.event !== 'start') {
        agentErrors.push('agent: first frame is not start: ' + text.substring(0, 80));
        this.ws.close(1002);
        return;
      }
      this.startNs = nowNs();
      const streamId = frame.stream_id || 's' + Math.random().toString(16).slice(2);
      this.callSid = String((frame.metadata && frame.metadata.call_sid) || streamId);
      agentCalls.set(this.callSid, this);
      this.ws.send(JSON.stringify({ event: 'ack', stream_id: streamId, config: {} }));
      this.prefix = '{"event":"media_output","stream_id":"' + streamId + '","media":{"payload":"';
      this.due = performance.now();
      this.speak();
      return;
    }
    // media_input: the caller's frame, relayed by the server under test
    let st = fastStamp(data, MEDIA_INPUT);
    if (st === null) {
      const frame = JSON.parse(data.toString());
      if (frame.event !== 'media_input') return;
      st = readStamp(frame.media.payload);
    }
    this.up.see(st[0]);
    if (win.on) win.up.push((nowNs() - st[1]) / 1e6);
  }

  // One media_output every 20 ms on an absolute schedule from the ack (no drift).
  speak() {
    if (this.closed) return;
    const ws = this.ws;
    if (ws.readyState !== WebSocket.OPEN) return;
    ws.send(this.prefix + stampHead(this.sent) + TAIL_B64 + '"}}');
    if (this.sent === 0) this.firstOutNs = nowNs();
    this.sent++;
    this.due += FRAME_MS;
    const delay = this.due - performance.now();
    if (delay <= 0 && win.on) win.late.push(-delay);
    this.timer = setTimeout(() => this.speak(), delay > 0 ? delay : 0);
  }

  close() {
    this.closed = true;
    if (this.timer) clearTimeout(this.timer);
  }
}

function restHandler(req, res) {
  // Twilio's REST API as far as a hang-up goes: the bench never needs more.
  restRequests++;
  req.resume();
  req.on('end', () => {
    res.writeHead(200, { 'Content-Type': 'application/json' });
    res.end('{"sid":"CA00000000000000000000000000000000","status":"completed"}');
  });
}

const agentHttp = http.createServer(restHandler);
const wss = new WebSocketServer({ noServer: true, perMessageDeflate: false, maxPayload: 1 << 20 });
agentHttp.on('upgrade', (req, socket, head) => {
  const connectedNs = nowNs();
  if (!req.url.startsWith('/agents/stream/')) {
    socket.destroy();
    return;
  }
  socket.setNoDelay(true);
  wss.handleUpgrade(req, socket, head, (ws) => {
    const call = new AgentCall(ws, connectedNs);
    ws.on('message', (data) => call.onMessage(data));
    ws.on('close', () => call.close());
    ws.on('error', () => call.close());
  });
});

// ---------------------------------------------------------------- simulated Twilio calls

const keepAlive = new http.Agent({ keepAlive: true, maxSockets: Infinity });
let calls = []; // live Call objects

function post(url, form, signature) {
  const body = new URLSearchParams(form).toString();
  return new Promise((resolve, reject) => {
    const req = http.request(
      url,
      {
        method: 'POST',
        agent: keepAlive,
        headers: {
          'Content-Type': 'application/x-www-form-urlencoded',
          'Content-Length': Buffer.byteLength(body),
          'X-Twilio-Signature': signature,
        },
        timeout: 30000,
      },
      (res) => {
        const chunks = [];
        res.on('data', (c) => chunks.push(c));
        res.on('end', () => resolve([res.statusCode, Buffer.concat(chunks).toString()]));
        res.on('error', reject);
      },
    );
    req.on('timeout', () => req.destroy(new Error('webhook timed out')));
    req.on('error', reject);
    req.end(body);
  });
}

function unescapeXml(s) {
  return s
    .replace(/&quot;/g, '"')
    .replace(/&apos;/g, "'")
    .replace(/&lt;/g, '<')
    .replace(/&gt;/g, '>')
    .replace(/&amp;/g, '&');
}

class Call {
  constructor(spec) {
    Object.assign(this, spec); // call_sid, stream_sid, account_sid, form, signature, stream_url, stream_signature
    this.down = new SeqCheck();
    this.sent = 0;
    this.marks = 0;
    this.clears = 0;
    this.error = '';
    this.postNs = 0;
    this.twimlNs = 0;
    this.wsOpenNs = 0;
    this.startSentNs = 0;
    this.firstAudioNs = 0;
    this.ws = null;
    this.timer = null;
    this.stopping = false;
    this.upResolve = null;
    this.up = new Promise((r) => (this.upResolve = r));
  }

  fail(msg) {
    if (!this.error && !this.stopping) this.error = msg;
    this.upResolve();
  }

  async run(cfg) {
    try {
      this.postNs = nowNs();
      const [status, twiml] = await post(cfg.voice_url, this.form, this.signature);
      this.twimlNs = nowNs();
      if (status !== 200) throw new Error(`webhook answered ${status}: ${twiml.substring(0, 120)}`);
      const url = /<Stream[^>]*\burl="([^"]+)"/.exec(twiml);
      const session = /<Parameter[^>]*\bname="session"[^>]*\bvalue="([^"]*)"/.exec(twiml);
      if (!url || !session) throw new Error('no <Stream url> / session parameter in TwiML: ' + twiml.substring(0, 200));
      const streamUrl = unescapeXml(url[1]);
      if (streamUrl !== this.stream_url) throw new Error(`stream URL ${streamUrl} is not the one signed (${this.stream_url})`);
      this.open(streamUrl, this.stream_signature, unescapeXml(session[1]));
    } catch (e) {
      this.fail(String(e && e.message ? e.message : e));
    }
  }

  open(streamUrl, signature, session) {
    const ws = new WebSocket(streamUrl, {
      headers: { 'X-Twilio-Signature': signature },
      perMessageDeflate: false,
      maxPayload: 1 << 20,
      handshakeTimeout: 10000,
    });
    this.ws = ws;
    ws.on('open', () => {
      this.wsOpenNs = nowNs();
      ws._socket.setNoDelay(true);
      const sid = this.stream_sid;
      ws.send('{"event":"connected","protocol":"Call","version":"1.0.0"}');
      ws.send(
        JSON.stringify({
          event: 'start',
          sequenceNumber: '1',
          streamSid: sid,
          start: {
            accountSid: this.account_sid,
            streamSid: sid,
            callSid: this.call_sid,
            tracks: ['inbound'],
            mediaFormat: { encoding: 'audio/x-mulaw', sampleRate: 8000, channels: 1 },
            customParameters: { session },
          },
        }),
      );
      this.startSentNs = nowNs();
      this.pre = '{"event":"media","sequenceNumber":"';
      this.mid = '","streamSid":"' + sid + '","media":{"track":"inbound","chunk":"';
      this.markPre = '{"event":"mark","sequenceNumber":"0","streamSid":"' + sid + '","mark":{"name":"';
      this.due = performance.now();
      this.speak();
    });
    ws.on('message', (data) => this.onMessage(data));
    ws.on('unexpected-response', (_req, res) => this.fail(`media upgrade refused: HTTP ${res.statusCode}`));
    ws.on('error', (e) => this.fail('media socket error: ' + e.message));
    ws.on('close', (code, reason) => {
      if (this.timer) clearTimeout(this.timer);
      this.fail(`server closed the media socket: ${code} ${reason}`);
    });
  }

  // A `media` frame every 20 ms on an absolute schedule (no drift), as Twilio sends.
  speak() {
    if (this.stopping || this.ws.readyState !== WebSocket.OPEN) return;
    const seq = this.sent;
    this.ws.send(
      this.pre + (seq + 2) + this.mid + (seq + 1) + '","timestamp":"' + seq * 20 + '","payload":"' +
        stampHead(seq) + TAIL_B64 + '"}}',
    );
    this.sent++;
    this.due += FRAME_MS;
    const delay = this.due - performance.now();
    if (delay <= 0 && win.on) win.late.push(-delay);
    this.timer = setTimeout(() => this.speak(), delay > 0 ? delay : 0);
  }

  onMessage(data) {
    const fast = fastStamp(data, MEDIA);
    const frame = fast === null ? JSON.parse(data.toString()) : null;
    const event = fast === null ? frame.event : 'media';
    if (event === 'media') {
      const st = fast === null ? readStamp(frame.media.payload) : fast;
      this.down.see(st[0]);
      if (win.on) win.down.push((nowNs() - st[1]) / 1e6);
      if (!this.firstAudioNs) {
        this.firstAudioNs = nowNs();
        this.upResolve();
      }
    } else if (event === 'mark') {
      // Twilio echoes a mark once the audio queued before it has played. The bench echoes at
      // once: it measures the relay, not a playout buffer.
      this.marks++;
      if (win.on) win.marks++;
      this.ws.send(this.markPre + frame.mark.name + '"}}');
    } else if (event === 'clear') {
      this.clears++;
      if (win.on) win.clears++;
    } else if (win.on) {
      win.unexpected++;
    }
  }

  // `stop`, then close, as Twilio does when the caller hangs up.
  hangUp() {
    this.stopping = true;
    if (this.timer) clearTimeout(this.timer);
    const ws = this.ws;
    if (!ws) return Promise.resolve();
    if (ws.readyState === WebSocket.CLOSED) return Promise.resolve();
    return new Promise((resolve) => {
      const done = setTimeout(() => {
        ws.terminate();
        resolve();
      }, 5000);
      ws.once('close', () => {
        clearTimeout(done);
        resolve();
      });
      if (ws.readyState === WebSocket.OPEN) {
        ws.send(
          JSON.stringify({
            event: 'stop',
            sequenceNumber: String(this.sent + 2),
            streamSid: this.stream_sid,
            stop: { accountSid: this.account_sid, callSid: this.call_sid },
          }),
        );
        ws.close(1000);
      } else {
        ws.terminate();
      }
    });
  }

  report() {
    const a = agentCalls.get(this.call_sid);
    return {
      call_sid: this.call_sid,
      error: this.error,
      post_ns: this.postNs,
      twiml_ns: this.twimlNs,
      ws_open_ns: this.wsOpenNs,
      start_sent_ns: this.startSentNs,
      first_audio_ns: this.firstAudioNs,
      agent: a ? { connected_ns: a.connectedNs, start_ns: a.startNs, first_out_ns: a.firstOutNs } : null,
    };
  }
}

// ---------------------------------------------------------------- commands

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function addCalls(cmd) {
  const cfg = { voice_url: cmd.voice_url };
  const added = cmd.calls.map((spec) => new Call(spec));
  calls.push(...added);
  const t0 = performance.now();
  const n = added.length;
  for (let i = 0; i < n; i++) {
    const delay = t0 + (cmd.spread_s * 1000 * i) / n - performance.now();
    if (delay > 0) await sleep(delay);
    added[i].run(cfg);
  }
  const timeout = sleep(cmd.up_timeout_s * 1000).then(() => 'timeout');
  await Promise.race([Promise.all(added.map((c) => c.up)), timeout]);
  for (const c of added) {
    if (!c.firstAudioNs && !c.error) c.error = `no agent audio within ${cmd.up_timeout_s} s`;
  }
  return { calls: added.map((c) => c.report()) };
}

let sentAtEnd = null;

// How late this engine's own event loop runs (1 ms probe): a frame that reaches the engine
// while it is busy waits that long before it is timestamped, which the server is blamed for.
const loopDelay = monitorEventLoopDelay({ resolution: 1 });
loopDelay.enable();

function windowStart() {
  loopDelay.reset();
  win.up = new Samples();
  win.down = new Samples();
  win.late = new Samples();
  win.marks = win.clears = win.unexpected = 0;
  for (const c of calls) c.down.resetWindow();
  for (const a of agentCalls.values()) a.up.resetWindow();
  win.on = true;
  return {};
}

async function windowEnd(cmd) {
  win.on = false;
  const loop = { p50: loopDelay.percentile(50) / 1e6, p99: loopDelay.percentile(99) / 1e6, max: loopDelay.max / 1e6 };
  const live = calls.filter((c) => !c.error && c.firstAudioNs);
  const upSent = new Map(live.map((c) => [c.call_sid, c.sent]));
  const downSent = new Map();
  for (const c of live) {
    const a = agentCalls.get(c.call_sid);
    if (a) downSent.set(c.call_sid, a.sent);
  }
  // frames sent before the window ended and still not received grace_s later are lost too
  await sleep(cmd.grace_s * 1000);
  const up = { lost: 0, duplicated: 0, reordered: 0 };
  const down = { lost: 0, duplicated: 0, reordered: 0 };
  for (const c of live) {
    down.lost += c.down.missing.size + Math.max(0, (downSent.get(c.call_sid) || 0) - 1 - c.down.maxSeen);
    down.duplicated += c.down.dup;
    down.reordered += c.down.reordered;
    const a = agentCalls.get(c.call_sid);
    if (!a) continue;
    up.lost += a.up.missing.size + Math.max(0, upSent.get(c.call_sid) - 1 - a.up.maxSeen);
    up.duplicated += a.up.dup;
    up.reordered += a.up.reordered;
  }
  const failed = calls.filter((c) => c.error).map((c) => c.error);
  return {
    calls_live: live.length,
    calls_failed_total: failed.length,
    failures: [...new Set(failed)].slice(0, 5),
    uplink_ms: win.up.stats(),
    downlink_ms: win.down.stats(),
    uplink_frames: { received: win.up.n, ...up },
    downlink_frames: { received: win.down.n, ...down },
    marks: win.marks,
    clears: win.clears,
    unexpected_frames: win.unexpected,
    generator_late_wakeups_ms: win.late.stats(),
    generator_loop_delay_ms: loop,
  };
}

async function hangUpAll() {
  const all = calls;
  calls = [];
  await Promise.all(all.map((c) => c.hangUp()));
  agentCalls.clear();
  return { hung_up: all.length };
}

function reply(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

const handlers = {
  add: addCalls,
  window_start: windowStart,
  window_end: windowEnd,
  hang_up_all: hangUpAll,
  status: () => ({ rest_requests: restRequests, agent_errors: agentErrors.slice(0, 10), calls: calls.length }),
  exit: () => {
    setTimeout(() => process.exit(0), 10);
    return {};
  },
};

agentHttp.listen(0, '127.0.0.1', 2048, () => {
  reply({ event: 'ready', agent_port: agentHttp.address().port, pid: process.pid });
});

readline.createInterface({ input: process.stdin }).on('line', async (line) => {
  let cmd;
  try {
    cmd = JSON.parse(line);
  } catch (e) {
    return;
  }
  try {
    const out = await handlers[cmd.cmd](cmd);
    reply({ id: cmd.id, ok: true, ...out });
  } catch (e) {
    reply({ id: cmd.id, ok: false, error: String(e && e.stack ? e.stack : e) });
  }
});
// The driver going away (stdin closed) ends the load at once: nothing is left running.
process.stdin.on('end', () => process.exit(0));
