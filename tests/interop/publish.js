// A Node.js "orders" service dispatching one Pigeon event with plain amqplib,
// following docs/wire-format.md. Usage:
//
//   node publish.js [URL] [EXCHANGE] [ROUTING_KEY] [PAYLOAD_JSON]
//
// Each argument falls back to an environment variable: PIGEON_URL,
// PIGEON_EXCHANGE, PIGEON_ROUTING_KEY, PIGEON_PAYLOAD. PIGEON_SERVICE (app_id),
// PIGEON_CORRELATION_ID and PIGEON_CAUSATION_ID are optional. Prints
// {"message_id", "correlation_id"} as JSON once the broker confirmed the message.
'use strict';

const crypto = require('node:crypto');
const amqp = require('amqplib');

async function main() {
  const [url, exchange, routingKey, payload] = [
    process.argv[2] || process.env.PIGEON_URL || 'amqp://guest:guest@localhost:5672/',
    process.argv[3] || process.env.PIGEON_EXCHANGE || 'pigeon.events',
    process.argv[4] || process.env.PIGEON_ROUTING_KEY || 'order.placed',
    process.argv[5] || process.env.PIGEON_PAYLOAD || '{}',
  ];
  const body = JSON.parse(payload); // refuse to send something that is not JSON
  const messageId = crypto.randomUUID();
  const correlationId = process.env.PIGEON_CORRELATION_ID || messageId;
  const headers = { 'x-pigeon-event-version': 1 };
  if (process.env.PIGEON_CAUSATION_ID) {
    headers['x-pigeon-causation-id'] = process.env.PIGEON_CAUSATION_ID;
  }

  const connection = await amqp.connect(url);
  try {
    const channel = await connection.createConfirmChannel();
    await channel.checkExchange(exchange); // Pigeon declares it; never redeclare with other arguments
    channel.publish(exchange, routingKey, Buffer.from(JSON.stringify(body), 'utf8'), {
      messageId,
      type: routingKey,
      appId: process.env.PIGEON_SERVICE || 'node-orders',
      contentType: 'application/json',
      persistent: true, // delivery_mode 2
      timestamp: Math.floor(Date.now() / 1000),
      correlationId,
      headers,
    });
    await channel.waitForConfirms();
    await channel.close();
  } finally {
    await connection.close();
  }
  process.stdout.write(`${JSON.stringify({ message_id: messageId, correlation_id: correlationId })}\n`);
}

main().catch((error) => {
  process.stderr.write(`publish.js: ${error.stack || error}\n`);
  process.exit(1);
});
