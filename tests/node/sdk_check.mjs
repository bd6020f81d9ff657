// Drives a running tcserve with the official TypeScript SDK (@anthropic-ai/sdk 0.137.0,
// the last release with client.completions). It checks:
//   1. a non-streaming client.completions.create(...)
//   2. a streaming one (stream: true), joining the `completion` deltas
//   3. a 404 for an unknown model: Anthropic.NotFoundError, status, error body type,
//      and the `request-id` header (exposed by the SDK as `err.requestID`)
// and prints ONE line of JSON to stdout; exit 0 on success, 1 on any unexpected error.
//
// Run (from tests/node, after `npm ci`):
//   ANTHROPIC_BASE_URL=http://127.0.0.1:PORT ANTHROPIC_API_KEY=sk-test node sdk_check.mjs
// Optional: TCSERVE_MODEL (default "claude-sonnet-4-5").
import Anthropic from '@anthropic-ai/sdk';

const client = new Anthropic({
  baseURL: process.env.ANTHROPIC_BASE_URL,
  apiKey: process.env.ANTHROPIC_API_KEY,
  maxRetries: 0,
});

const params = {
  model: process.env.TCSERVE_MODEL || 'claude-sonnet-4-5',
  prompt: '\n\nHuman: Say hello.\n\nAssistant:',
  max_tokens_to_sample: 16,
  temperature: 0,
};

async function main() {
  // 1. Non-streaming.
  const c = await client.completions.create(params);
  const create = {
    type: c.type,
    id: c.id,
    completion: c.completion,
    stop_reason: c.stop_reason,
    stop: c.stop,
    model: c.model,
  };

  // 2. Streaming: each event is a Completion carrying a `completion` delta.
  const stream = await client.completions.create({ ...params, stream: true });
  const deltas = [];
  let stopReason = null;
  for await (const event of stream) {
    deltas.push(event.completion ?? '');
    if (event.stop_reason != null) stopReason = event.stop_reason;
  }

  // 3. Unknown model -> 404 NotFoundError.
  let notFound;
  try {
    await client.completions.create({ ...params, model: 'no-such-model' });
    throw new Error('expected a 404 for model "no-such-model", but the request succeeded');
  } catch (err) {
    if (!(err instanceof Anthropic.APIError)) throw err;
    notFound = {
      status: err.status,
      type: err.error?.error?.type, // err.error is the parsed JSON error body
      request_id: err.requestID, // from the `request-id` response header
      is_not_found_error: err instanceof Anthropic.NotFoundError,
    };
  }

  const result = {
    create,
    stream: { text: deltas.join(''), events: deltas.length, stop_reason: stopReason },
    not_found: notFound,
  };
  process.stdout.write(JSON.stringify(result) + '\n');
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
