#!/usr/bin/env node
// A small command line over the Node.js client:
//   pigeon-js listen --gate HOST:PORT --token JWT [--count N]   JSON lines, one per event
//   pigeon-js send --gate HOST:PORT --token JWT TO BODY          prints the message id
import process from 'node:process';
import { parseArgs } from 'node:util';

import { UserClient } from '../src/index.js';

const USAGE = `usage: pigeon-js listen --gate HOST:PORT --token JWT [--count N]
       pigeon-js send --gate HOST:PORT --token JWT TO BODY

The token defaults to PIGEON_TOKEN and the Gate to PIGEON_GATE (else 127.0.0.1:7070).`;

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
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  const [command, ...rest] = positionals;
  if (values.help || !['listen', 'send'].includes(command) || !values.token
      || (command === 'send' && rest.length !== 2)) {
    (values.help ? process.stdout : process.stderr).write(`${USAGE}\n`);
    return values.help ? 0 : 2;
  }
  const client = new UserClient({ gate: values.gate, token: values.token });
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
