#!/usr/bin/env node
// A small command line over the Node.js client:
//   pigeon-js listen --gate HOST:PORT --token JWT [--since SEQ] [--since-broadcast SEQ] [--count N]
//                                                                JSON lines, one per event
//   pigeon-js send --gate HOST:PORT --token JWT TO BODY          prints the message id
import process from 'node:process';
import { parseArgs } from 'node:util';

import { UserClient } from '../src/index.js';

const USAGE = `usage: pigeon-js listen --gate HOST:PORT --token JWT [--since SEQ] [--since-broadcast SEQ] [--count N]
       pigeon-js send --gate HOST:PORT --token JWT TO BODY

listen replays the inbox after SEQ (--since 0: from the start) and the broadcasts after
--since-broadcast, then prints what arrives; without them it starts at the live end.
The token defaults to PIGEON_TOKEN and the Gate to PIGEON_GATE (else 127.0.0.1:7070).`;

// A cursor position from the command line: a whole number of at least 0, else undefined.
function position(text) {
  return /^\d+$/.test(text ?? '') ? Number(text) : undefined;
}

function print(value) {
  process.stdout.write(`${JSON.stringify(value)}\n`);
}

async function main() {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      gate: { type: 'string', default: process.env.PIGEON_GATE || '127.0.0.1:7070' },
      token: { type: 'string', default: process.env.PIGEON_TOKEN || '' },
      count: { type: 'string', default: '0' },
      since: { type: 'string' },
      'since-broadcast': { type: 'string' },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  const [command, ...rest] = positionals;
  const since = position(values.since);
  const sinceBroadcast = position(values['since-broadcast']);
  if (values.help || !['listen', 'send'].includes(command) || !values.token
      || (command === 'send' && rest.length !== 2)
      || (values.since !== undefined && since === undefined)
      || (values['since-broadcast'] !== undefined && sinceBroadcast === undefined)) {
    (values.help ? process.stdout : process.stderr).write(`${USAGE}\n`);
    return values.help ? 0 : 2;
  }
  const client = new UserClient({
    gate: values.gate,
    token: values.token,
    cursor: { seq: since, broadcast_seq: sinceBroadcast },
  });
  if (command === 'send') {
    await client.connect();
    try {
      print({ message_id: await client.send(rest[0], rest[1]) });
    } finally {
      client.close();
    }
    return 0;
  }
  const wanted = Number(values.count);
  let received = 0;
  return new Promise((resolve, reject) => {
    const stop = (code) => { client.close(); resolve(code); };
    client.on('connected', (e) => print({ type: 'connected', ...e }));
    client.on('disconnected', (e) => print({ type: 'disconnected', reason: e.reason, retry_in_ms: e.retryInMs }));
    client.on('unread', (count) => print({ type: 'unread', count }));
    client.on('message', (m) => {
      print({ type: 'message', id: m.id, seq: m.seq, kind: m.kind, sender: m.sender, title: m.title, body: m.body });
      received += 1;
      if (wanted && received >= wanted) stop(0);
    });
    client.on('error', reject);
    process.on('SIGINT', () => stop(0));
    process.on('SIGTERM', () => stop(0));
    client.connect().catch(reject);
  });
}

main().then(
  (code) => process.exit(code),
  (error) => {
    process.stderr.write(`pigeon-js: ${error.message}${error.reason ? ` (${error.reason})` : ''}\n`);
    process.exit(error.code === 14 ? 3 : 1);
  },
);
