// A Node.js client of Pigeon, built at run time from the same .proto files as the servers.
//
// UserClient connects through the Gate with the user's JWT, holds the user's stream on the node
// the Gate picks, and resumes it from its cursor after any failure (node crash, drain, network
// error, silence), dropping duplicates so that each message is emitted once, in seq order per
// stream. It also sends messages and reads the unread count.

import { randomUUID } from 'node:crypto';
import { EventEmitter } from 'node:events';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';

const HERE = path.dirname(fileURLToPath(import.meta.url));

/** Where the protos live in this repository (pigeon/v1/*.proto under it). */
export const PROTO_ROOT = path.resolve(HERE, '../../../protos');
/** The google/api annotations the protos import. */
export const GOOGLEAPIS_ROOT = path.resolve(HERE, '../../../third_party/googleapis');

const Status = grpc.status;
// "A client that hears nothing for about two intervals should reconnect"; half more for slack.
const HEARTBEAT_SLACK = 2.5;
const DEFAULT_BACKOFF = { initialMs: 500, maxMs: 30000, multiplier: 2 };
const PERMANENT = new Set([
  Status.UNAUTHENTICATED,
  Status.PERMISSION_DENIED,
  Status.INVALID_ARGUMENT,
  Status.UNIMPLEMENTED,
  Status.NOT_FOUND,
]);

/**
 * Load the pigeon.v1 package (Gate and Node services and their messages).
 * Field names stay as in the protos (snake_case); 64-bit integers are Numbers.
 */
export function loadPigeon({ protoRoot = PROTO_ROOT, includeDirs = [GOOGLEAPIS_ROOT] } = {}) {
  const definition = protoLoader.loadSync(['pigeon/v1/gate.proto', 'pigeon/v1/node.proto'], {
    includeDirs: [protoRoot, ...includeDirs],
    keepCase: true,
    longs: Number,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).pigeon.v1;
}

/**
 * An error a Pigeon service sent: the gRPC code, its message, the ErrorInfo reason and metadata,
 * and the wait its RetryInfo asks for before a retry (`retryAfterMs`, null without one).
 */
export class PigeonError extends Error {
  constructor(message, {
    code = Status.UNKNOWN, reason = '', metadata = {}, retryAfterMs = null,
  } = {}) {
    super(message);
    this.name = 'PigeonError';
    this.code = code;
    this.reason = reason || (Status[code] ?? 'UNKNOWN');
    this.metadata = metadata;
    this.retryAfterMs = retryAfterMs;
  }

  static from(error) {
    if (error instanceof PigeonError) return error;
    const details = error.metadata?.get?.('grpc-status-details-bin')?.[0];
    let info = {};
    if (Buffer.isBuffer(details)) {
      try {
        info = errorInfo(details);
      } catch {
        // A malformed trailer: the code and message still say enough.
      }
    }
    return new PigeonError(error.details || error.message, {
      code: error.code ?? Status.UNKNOWN,
      ...info,
    });
  }
}

// Enough protobuf wire decoding to read google.rpc.Status.details[] -> ErrorInfo, without
// shipping the google.rpc protos.
function* fields(buffer) {
  let pos = 0;
  const varint = () => {
    let result = 0n;
    let shift = 0n;
    for (;;) {
      const byte = buffer[pos++];
      if (byte === undefined) throw new Error('truncated');
      result |= BigInt(byte & 0x7f) << shift;
      if (!(byte & 0x80)) return result;
      shift += 7n;
    }
  };
  while (pos < buffer.length) {
    const key = Number(varint());
    const [number, type] = [key >>> 3, key & 7];
    if (type === 0) yield [number, varint()];
    else if (type === 2) {
      const length = Number(varint());
      yield [number, buffer.subarray(pos, pos + length)];
      pos += length;
    } else if (type === 1) pos += 8;
    else if (type === 5) pos += 4;
    else throw new Error(`wire type ${type}`);
  }
}

function errorInfo(status) {
  const info = { reason: '', metadata: {}, retryAfterMs: null };
  for (const [number, any] of fields(status)) {
    if (number !== 3) continue;
    const parts = Object.fromEntries(fields(any));
    const type = String(parts[1]);
    if (type === 'type.googleapis.com/google.rpc.RetryInfo') {
      const delay = Object.fromEntries(fields(Object.fromEntries(fields(parts[2]))[1] ?? []));
      info.retryAfterMs = Number(delay[1] ?? 0n) * 1000 + Number(delay[2] ?? 0n) / 1e6;
    }
    if (type !== 'type.googleapis.com/google.rpc.ErrorInfo') continue;
    for (const [field, value] of fields(parts[2])) {
      if (field === 1) info.reason = String(value);
      if (field === 3) {
        const entry = Object.fromEntries(fields(value));
        info.metadata[String(entry[1] ?? '')] = String(entry[2] ?? '');
      }
    }
  }
  return info;
}

const seconds = (duration) => (Number(duration?.seconds ?? 0) + (duration?.nanos ?? 0) / 1e9);

/**
 * A user's connection. Events: 'message' (each message once, in seq order per stream),
 * 'unread' (the unread count when it changes), 'connected' and 'disconnected' (around
 * reconnects), 'error' (the client stopped on an error it cannot recover from).
 *
 *   const client = new UserClient({ gate: '127.0.0.1:7070', token: jwt });
 *   client.on('message', (m) => console.log(`${m.sender}: ${m.body}`));
 *   await client.connect();
 *   await client.send('bob', 'Lunch at noon?');
 */
export class UserClient extends EventEmitter {
  constructor({
    gate,
    token,
    credentials = grpc.credentials.createInsecure(),
    cursor = {},
    connectTimeoutMs = 10000,
    callTimeoutMs = 10000,
    pigeon = loadPigeon(),
  }) {
    super();
    this.gates = Array.isArray(gate) ? gate : [gate];
    this.token = token; // a string, or a (possibly async) function returning a fresh JWT
    this.credentials = credentials;
    this.seq = cursor.seq ?? null;
    this.broadcastSeq = cursor.broadcast_seq ?? null;
    this.connectTimeoutMs = connectTimeoutMs;
    this.callTimeoutMs = callTimeoutMs;
    this.pigeon = pigeon;
    this.backoff = DEFAULT_BACKOFF;
    this.clients = new Map();
    this.session = null;
    this.generation = 0;
    this.unread = null;
    this.closed = false;
    this.call = null;
    this.interruptReason = null;
    this.gateIndex = 0;
    this.pauses = new Set(); // the backoff waits in progress, ended early by close()
  }

  /** The position after the last message emitted; pass it back as `cursor` to resume later. */
  get cursor() {
    return { seq: this.seq, broadcast_seq: this.broadcastSeq };
  }

  /** Connect and open the stream; resolves once it is open (rejects on a refused token). */
  connect() {
    const opened = new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        cleanup();
        this.close();
        reject(new PigeonError(`could not connect through ${this.gates.join(', ')}`, {
          code: Status.UNAVAILABLE,
        }));
      }, this.connectTimeoutMs);
      const onConnected = () => { cleanup(); resolve(); };
      const onFailed = (error) => { cleanup(); reject(error); };
      const cleanup = () => {
        clearTimeout(timer);
        this.off('connected', onConnected);
        this.off('_failed', onFailed);
      };
      this.once('connected', onConnected);
      this.once('_failed', onFailed);
    });
    this.running = this.run();
    return opened;
  }

  /** Close the stream and the channels. */
  close() {
    this.closed = true;
    this.call?.cancel();
    clearTimeout(this.refreshTimer);
    for (const end of this.pauses) end();
    for (const client of this.clients.values()) client.close();
    this.clients.clear();
  }

  /** Send a message; resolves with its id once it is stored. */
  async send(to, body, { title = '', metadata = {}, idempotencyKey = randomUUID() } = {}) {
    const request = {
      to: Array.isArray(to) ? to : [to],
      body,
      title,
      metadata,
      // The same key on the retry after a reconnect: the message is stored once.
      idempotency_key: idempotencyKey,
    };
    const reply = await this.unary('Send', request);
    return reply.message_id;
  }

  /** The user's unread count, asked of the node. */
  async unreadCount() {
    return (await this.unary('GetUnreadCount', {})).unread_count;
  }

  // Calls on the node holding the stream, retried once through a reconnect when the node is
  // gone (UNAVAILABLE) or the session expired (UNAUTHENTICATED).
  async unary(method, request) {
    for (let attempt = 0; ; attempt++) {
      const session = await this.currentSession();
      try {
        return await new Promise((resolve, reject) => {
          const metadata = new grpc.Metadata();
          metadata.set('authorization', `Bearer ${session.token}`);
          this.node(session.address)[method](
            request,
            metadata,
            { deadline: Date.now() + this.callTimeoutMs },
            (error, reply) => (error ? reject(error) : resolve(reply)),
          );
        });
      } catch (error) {
        const retry = [Status.UNAVAILABLE, Status.UNAUTHENTICATED].includes(error.code);
        if (attempt === 0 && retry) {
          this.interrupt(session.generation, 'request_failed');
          continue;
        }
        throw PigeonError.from(error);
      }
    }
  }

  async currentSession() {
    const deadline = Date.now() + this.callTimeoutMs;
    while (!this.session) {
      if (this.closed || this.failure) throw this.failure ?? new PigeonError('client closed');
      if (Date.now() > deadline) {
        throw new PigeonError('not connected to any node', { code: Status.UNAVAILABLE });
      }
      await this.sleep(20);
    }
    return this.session;
  }

  interrupt(generation, reason) {
    if (this.session?.generation !== generation) return;
    this.session = null;
    this.interruptReason = reason;
    this.call?.cancel();
  }

  gate() {
    const address = this.gates[this.gateIndex % this.gates.length];
    return this.client('Gate', address);
  }

  node(address) {
    return this.client('Node', address);
  }

  client(service, address) {
    const key = `${service} ${address}`;
    if (!this.clients.has(key)) {
      this.clients.set(key, new this.pigeon[service](address, this.credentials, {
        // The client paces its own reconnects; gRPC's channel backoff would add to them.
        'grpc.initial_reconnect_backoff_ms': 100,
        'grpc.max_reconnect_backoff_ms': 1000,
      }));
    }
    return this.clients.get(key);
  }

  // Wait ms, or less if the client is closed meanwhile (no timer keeps the process alive).
  sleep(ms) {
    if (this.closed) return Promise.resolve();
    return new Promise((resolve) => {
      const end = () => {
        clearTimeout(timer);
        this.pauses.delete(end);
        resolve();
      };
      const timer = setTimeout(end, ms);
      this.pauses.add(end);
    });
  }

  // Hand an event to the application's listeners. A listener that throws is a bug in the
  // application: it is reported and delivery goes on (the rest of the event, the stream).
  deliver(name, value) {
    // Each listener on its own: emit() stops at the first that throws, which would skip the
    // others (connect()'s own among them).
    for (const listener of this.rawListeners(name)) {
      try {
        listener.call(this, value);
      } catch (error) {
        console.error(`pigeon: a '${name}' listener threw:`, error);
      }
    }
  }

  delay(attempt) {
    const { initialMs, maxMs, multiplier } = this.backoff;
    // Full jitter: a random wait up to the exponential bound spreads a crowd of clients.
    return Math.random() * Math.min(maxMs, initialMs * multiplier ** Math.min(attempt, 64));
  }

  async run() {
    let failures = 0;
    while (!this.closed) {
      let reply;
      try {
        reply = await this.connectGate();
      } catch (error) {
        if (PERMANENT.has(error.code)) return this.fail(error);
        await this.sleep(this.delay(failures++));
        continue;
      }
      let outcome = { unreachable: true };
      const targets = [
        { node_id: reply.node_id, address: reply.node_address },
        ...reply.fallbacks,
      ];
      // Each node gets an equal share of the time to welcome: one that accepts and never
      // answers must leave time for the fallbacks within connect()'s limit.
      const shareMs = this.connectTimeoutMs / targets.length;
      for (const target of targets) {
        if (this.closed) return undefined;
        outcome = await this.stream(reply, target, shareMs);
        if (!outcome.unreachable) break;
      }
      if (this.closed) return undefined;
      if (!outcome.established && outcome.error && PERMANENT.has(outcome.error.code)
          && outcome.error.code !== Status.UNAUTHENTICATED) {
        return this.fail(outcome.error);
      }
      // Not on the welcome alone: a node that welcomes and then fails every time (a store error
      // in the replay) must see the client back off.
      failures = outcome.pastReplay ? 0 : failures + 1;
      const wait = outcome.retryAfterMs ?? this.delay(failures);
      if (outcome.established) {
        this.deliver('disconnected', { reason: outcome.reason, retryInMs: wait, error: outcome.error });
      }
      await this.sleep(wait);
    }
    return undefined;
  }

  fail(error) {
    this.failure = error;
    this.closed = true;
    this.emit('_failed', error);
    if (this.listenerCount('error') > 0) this.deliver('error', error);
  }

  async connectGate() {
    const token = typeof this.token === 'function' ? await this.token() : this.token;
    try {
      const reply = await new Promise((resolve, reject) => {
        this.gate().Connect(
          { token },
          { deadline: Date.now() + this.callTimeoutMs },
          (error, answer) => (error ? reject(error) : resolve(answer)),
        );
      });
      if (reply.backoff?.initial) {
        this.backoff = {
          initialMs: seconds(reply.backoff.initial) * 1000 || DEFAULT_BACKOFF.initialMs,
          maxMs: seconds(reply.backoff.max) * 1000 || DEFAULT_BACKOFF.maxMs,
          multiplier: reply.backoff.multiplier || DEFAULT_BACKOFF.multiplier,
        };
      }
      return reply;
    } catch (error) {
      this.gateIndex += 1; // try the next Gate next time
      throw PigeonError.from(error);
    }
  }

  // Subscribe on one node and deliver until the stream ends; resolves with how it ended.
  stream(reply, target, welcomeWithinMs) {
    return new Promise((resolve) => {
      const request = {};
      if (this.seq !== null) request.since_seq = this.seq;
      if (this.broadcastSeq !== null) request.since_broadcast_seq = this.broadcastSeq;
      const metadata = new grpc.Metadata();
      metadata.set('authorization', `Bearer ${reply.session_token}`);
      const call = this.node(target.address).Subscribe(request, metadata);
      this.call = call;
      this.interruptReason = null;
      let established = false;
      let mySession = null;
      let live = false;
      let settled = false;
      let watchdog;
      let silenceMs = welcomeWithinMs;
      const finish = (outcome) => {
        if (settled) return;
        settled = true;
        clearTimeout(watchdog);
        clearTimeout(this.refreshTimer);
        if (this.call === call) this.call = null;
        if (this.session === mySession) this.session = null;
        call.cancel();
        resolve({ established, pastReplay: live, ...outcome });
      };
      const arm = () => {
        clearTimeout(watchdog);
        watchdog = setTimeout(() => finish(established
          ? { reason: 'heartbeat_timeout' }
          : { reason: 'connect_timeout', unreachable: true }), silenceMs);
      };
      arm();
      call.on('data', (event) => {
        if (settled) return;
        arm();
        if (!established) {
          if (!event.welcome) {
            finish({ reason: 'connect_failed', unreachable: true });
            return;
          }
          established = true;
          if (this.seq === null) this.seq = event.cursor?.seq ?? 0;
          if (this.broadcastSeq === null) this.broadcastSeq = event.cursor?.broadcast_seq ?? 0;
          this.generation += 1;
          mySession = {
            generation: this.generation,
            address: target.address,
            token: reply.session_token,
          };
          this.session = mySession;
          const heartbeat = seconds(event.welcome.heartbeat_interval)
            || seconds(reply.heartbeat_interval) || 15;
          silenceMs = heartbeat * HEARTBEAT_SLACK * 1000;
          arm();
          this.scheduleRefresh(reply, this.generation);
          this.deliver('connected', {
            nodeId: event.welcome.node_id || target.node_id,
            address: target.address,
            userId: event.welcome.user_id,
            reconnected: this.generation > 1,
          });
        }
        if (!this.accept(event, live)) {
          finish({ reason: 'gap', retryAfterMs: 0 });
          return;
        }
        if (event.replay_done) live = true;
        if (event.reconnect) {
          const waitMs = seconds(event.reconnect.retry_after) * 1000;
          finish({ reason: event.reconnect.reason || 'reconnect', retryAfterMs: waitMs * (1 + Math.random()) });
        }
      });
      call.on('error', (error) => {
        if (this.interruptReason && error.code === Status.CANCELLED) {
          finish({ reason: this.interruptReason, retryAfterMs: 0 });
          return;
        }
        const failure = PigeonError.from(error);
        finish(established
          ? { reason: 'connection_lost', error: failure }
          : { reason: 'connect_failed', error: failure, unreachable: !PERMANENT.has(error.code) });
      });
      call.on('end', () => finish({ reason: 'connection_lost', unreachable: !established }));
    });
  }

  // Emit an event's news; false when a live message skipped a seq (resubscribe from the cursor;
  // replayed messages may skip the seqs of deleted ones).
  accept(event, live) {
    for (const message of event.messages ?? []) {
      if (this.closed) return true; // closed by a listener: the rest of the event is not handed out
      const broadcast = message.kind === 'MESSAGE_KIND_BROADCAST';
      const last = broadcast ? this.broadcastSeq : this.seq;
      if (last !== null && message.seq <= last) continue; // a duplicate
      if (live && last !== null && message.seq !== last + 1) return false;
      if (broadcast) this.broadcastSeq = message.seq;
      else this.seq = message.seq;
      this.deliver('message', message);
    }
    const unread = event.unread_count;
    if (unread !== undefined && unread !== null && unread !== this.unread && !this.closed) {
      this.unread = unread;
      this.deliver('unread', unread);
    }
    return true;
  }

  // Reconnect a little before the session token expires.
  scheduleRefresh(reply, generation) {
    const expires = seconds(reply.session_expires_at) * 1000;
    const ttl = expires - Date.now();
    if (!expires || ttl <= 0) return;
    this.refreshTimer = setTimeout(
      () => this.interrupt(generation, 'session_refresh'),
      ttl - Math.min(60000, ttl / 5),
    );
  }
}
