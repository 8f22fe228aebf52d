// k6 load test of the seckill endpoint, POST /api/v1/sales/{id}/orders.
//
// Buyer tokens are made here from the shared secret (HS256, as the server
// expects), one distinct buyer per iteration. Two models:
//   SCENARIO=closed  a fixed number of virtual users looping (default)
//   SCENARIO=open    a fixed arrival rate, whatever the latency
// Every answer is checked against the contract: 201 with an order, or the
// contract's error body with a code allowed for this endpoint.
//
//   BASE_URL=http://127.0.0.1:8080 FLASHSALE_JWT_SECRET=... FLASHSALE_ADMIN_TOKEN=... k6 run seckill.js
//
// Without SALE_ID, setup() creates a sale (STOCK units, open now for an hour).

import http from 'k6/http';
import crypto from 'k6/crypto';
import encoding from 'k6/encoding';
import { check } from 'k6';
import { Counter } from 'k6/metrics';

const BASE_URL = __ENV.BASE_URL || 'http://127.0.0.1:8080';
const SECRET = __ENV.FLASHSALE_JWT_SECRET || 'dev-jwt-secret-change-me-32-bytes-min';
const ADMIN = __ENV.FLASHSALE_ADMIN_TOKEN || 'dev-admin-token-change-me-32-bytes-min';
const STOCK = parseInt(__ENV.STOCK || '1000');
const VUS = parseInt(__ENV.VUS || '50');
const DURATION = __ENV.DURATION || '30s';
const RATE = parseInt(__ENV.RATE || '2000');

const reserved = new Counter('flashsale_reserved');
const soldOut = new Counter('flashsale_sold_out');

const scenarios = {
  closed: {
    executor: 'constant-vus',
    vus: VUS,
    duration: DURATION,
  },
  open: {
    executor: 'constant-arrival-rate',
    rate: RATE,
    timeUnit: '1s',
    duration: DURATION,
    preAllocatedVUs: VUS,
    maxVUs: VUS * 4,
  },
};

export const options = {
  scenarios: { seckill: scenarios[__ENV.SCENARIO || 'closed'] },
  thresholds: {
    // 201 and 409 (sold out, limit) are the expected answers; anything else
    // (shedding, faults) must stay under 1% of requests.
    http_req_failed: ['rate<0.01'],
    checks: ['rate>0.999'],
    'http_req_duration{name:reserve}': [`p(99)<${__ENV.P99_MS || 500}`],
  },
};

http.setResponseCallback(http.expectedStatuses(201, 409));

function b64url(s) {
  return encoding.b64encode(s, 'rawurl');
}

// An HS256 JWT for buyer `user`, valid for an hour.
export function token(user) {
  const now = Math.floor(Date.now() / 1000);
  const head = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const body = b64url(JSON.stringify({ sub: String(user), exp: now + 3600, iat: now }));
  const sig = crypto.hmac('sha256', SECRET, `${head}.${body}`, 'base64')
    .replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
  return `${head}.${body}.${sig}`;
}

export function setup() {
  if (__ENV.SALE_ID) {
    return { sale: __ENV.SALE_ID };
  }
  const now = Date.now();
  const res = http.post(`${BASE_URL}/api/v1/sales`, JSON.stringify({
    sku: `K6-${now}`, title: 'k6 load test', price_cents: 100, stock: STOCK,
    start_at: new Date(now - 1000).toISOString(), end_at: new Date(now + 3600e3).toISOString(),
    per_user_limit: 1, payment_window_secs: 900,
  }), { headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${ADMIN}` } });
  check(res, { 'sale created (201)': (r) => r.status === 201 });
  return { sale: res.json('sale_id') };
}

const ERRORS = {
  400: ['invalid_request'],
  401: ['unauthorized'],
  404: ['not_found'],
  409: ['sale_not_started', 'sale_ended', 'sold_out', 'limit_exceeded'],
  413: ['payload_too_large'],
  429: ['rate_limited'],
  503: ['unavailable'],
};

export default function (data) {
  // A distinct buyer per iteration across VUs.
  const user = __VU * 1000000 + __ITER + 1;
  const res = http.post(`${BASE_URL}/api/v1/sales/${data.sale}/orders`, '{"qty":1}', {
    headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${token(user)}` },
    tags: { name: 'reserve' },
  });
  if (res.status === 201) {
    reserved.add(1);
    check(res, {
      '201 carries a pending order of this buyer': (r) => r.json('status') === 'pending'
        && r.json('user_id') === String(user) && String(r.json('order_id')).startsWith(`${data.sale}-`),
    });
    return;
  }
  const allowed = ERRORS[res.status];
  check(res, {
    'status is one of the contract': () => allowed !== undefined,
    'error body names an allowed code': (r) => allowed !== undefined
      && allowed.includes(r.json('error.code')) && typeof r.json('error.message') === 'string',
    'shedding and rate limits say when to retry': (r) => (r.status !== 503 && r.status !== 429)
      || r.headers['Retry-After'] !== undefined,
  });
  if (res.json('error.code') === 'sold_out') {
    soldOut.add(1);
  }
}
