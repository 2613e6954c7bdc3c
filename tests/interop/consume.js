// A Node.js service consuming one Pigeon event with plain amqplib. Usage:
//
//   node consume.js [URL] [EXCHANGE] [BINDING_KEY]
//
// Each argument falls back to PIGEON_URL, PIGEON_EXCHANGE, PIGEON_BINDING_KEY.
// It binds an exclusive queue to the exchange, prints {"ready": true} once it
// is consuming, then prints the first message it receives -- its AMQP
// properties (with the wire-format names), headers and JSON body -- as one
// line of JSON, acks it and exits 0. Exits 1 after PIGEON_TIMEOUT_MS (10000).
'use strict';

const amqp = require('amqplib');

function plain(value) {
  // Header values arrive as strings, numbers, Buffers or nested tables.
  if (Buffer.isBuffer(value)) return value.toString('utf8');
  if (value && typeof value === 'object' && !Array.isArray(value)) {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, plain(v)]));
  }
  return Array.isArray(value) ? value.map(plain) : value;
}

async function main() {
  const [url, exchange, bindingKey] = [
    process.argv[2] || process.env.PIGEON_URL || 'amqp://guest:guest@localhost:5672/',
    process.argv[3] || process.env.PIGEON_EXCHANGE || 'pigeon.events',
    process.argv[4] || process.env.PIGEON_BINDING_KEY || '#',
  ];
  const timeoutMs = Number(process.env.PIGEON_TIMEOUT_MS || 10000);
  const connection = await amqp.connect(url);
  const channel = await connection.createChannel();
  await channel.checkExchange(exchange);
  const { queue } = await channel.assertQueue('', { exclusive: true });
  await channel.bindQueue(queue, exchange, bindingKey);

  let deliver;
  const delivered = new Promise((resolve) => {
    deliver = resolve;
  });
  await channel.consume(queue, (message) => {
    if (message === null) return; // cancelled by the broker
    channel.ack(message);
    deliver(message);
  });
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no message within ${timeoutMs} ms`)), timeoutMs);
  });
  process.stdout.write(`${JSON.stringify({ ready: true })}\n`);

  try {
    const message = await Promise.race([delivered, timeout]);
    const p = message.properties;
    const report = {
      exchange: message.fields.exchange,
      routing_key: message.fields.routingKey,
      properties: {
        message_id: p.messageId,
        type: p.type,
        app_id: p.appId,
        content_type: p.contentType,
        content_encoding: p.contentEncoding ?? null,
        delivery_mode: p.deliveryMode,
        timestamp: p.timestamp,
        correlation_id: p.correlationId,
      },
      headers: plain(p.headers || {}),
      body: JSON.parse(message.content.toString('utf8')),
    };
    process.stdout.write(`${JSON.stringify(report)}\n`);
  } finally {
    clearTimeout(timer);
    await connection.close();
  }
}

main().catch((error) => {
  process.stderr.write(`consume.js: ${error.stack || error}\n`);
  process.exit(1);
});
