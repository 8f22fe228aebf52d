// The peer a Node shop would use to close unpaid orders: BullMQ delayed jobs
// (one per order, all due at the same moment), drained by one Worker. It
// prints what loadtest/bench.sh puts beside flashsale's expiry drain:
//
//   jobs=<n> concurrency=<c> drain_per_sec=<jobs/s from the due time to the
//   last job done> late_p50_ms=<..> late_p99_ms=<..> late_max_ms=<..>
//
// Lateness is when the worker started the job minus when it was due, by the
// local clock (Redis's and this host's are the same machine's here).
//
//   JOBS=200000 CONCURRENCY=100 node drain.mjs   (REDIS_HOST, REDIS_PORT)
//
// bench.sh installs bullmq into a scratch folder beside a copy of this file;
// the queue gets a name of its own and is obliterated afterwards.
import { Queue, Worker } from 'bullmq';

const jobs = Number(process.env.JOBS ?? 200000);
const concurrency = Number(process.env.CONCURRENCY ?? 100);
const connection = {
  host: process.env.REDIS_HOST ?? '127.0.0.1',
  port: Number(process.env.REDIS_PORT ?? 6379),
};
const name = `fsbench_bullmq_${process.pid}`;
const queue = new Queue(name, { connection });

// Adds `n` jobs in chunks of 1000, each due at `due` (ms since the epoch).
const chunk = 1000;
async function addAll(q, n, due) {
  for (let i = 0; i < n; i += chunk) {
    const batch = [];
    for (let j = i; j < Math.min(n, i + chunk); j++) {
      batch.push({
        name: 'close',
        data: { order: j, due },
        opts: { delay: Math.max(0, due - Date.now()), removeOnComplete: true, removeOnFail: true },
      });
    }
    await q.addBulk(batch);
  }
}

// The lead leaves room for adding every job before they fall due (a worker
// started late would count against BullMQ): adding runs 30-150 us a job on
// this machine kind, so the rate is measured first on a scratch queue of
// 3,000 jobs and the lead is 1.5 times the time it predicts.
let lead = Number(process.env.LEAD_MS ?? 0);
if (!lead) {
  const probe = new Queue(`${name}_probe`, { connection });
  const t0 = performance.now();
  await addAll(probe, 3000, Date.now() + 3_600_000);
  const perJob = (performance.now() - t0) / 3000;
  await probe.obliterate({ force: true });
  await probe.close();
  lead = Math.max(3000, Math.round(perJob * jobs * 1.5) + 1000);
}

// Every job due at the same moment, `lead` ms after the first is added
// (adding them all must take less than that: the script says when not).
const due = Date.now() + lead;
await addAll(queue, jobs, due);
const added = Date.now();
if (added > due) {
  console.error(`adding took ${added - (due - lead)} ms, past the due time: raise LEAD_MS`);
}

const late = new Float64Array(jobs);
let done = 0;
let last = 0;
const finished = new Promise((resolve) => {
  const worker = new Worker(
    name,
    async (job) => {
      late[done] = Date.now() - job.data.due;
      done += 1;
      if (done === jobs) {
        last = Date.now();
        resolve(worker);
      }
    },
    { connection, concurrency },
  );
});
const worker = await finished;
await worker.close();
await queue.obliterate({ force: true });
await queue.close();

const sorted = Array.from(late).sort((a, b) => a - b);
const pct = (p) => sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
const secs = Math.max(1, last - due) / 1000;
console.log(
  `jobs=${jobs} concurrency=${concurrency} drain_per_sec=${Math.round(jobs / secs)} ` +
    `late_p50_ms=${pct(50).toFixed(0)} late_p99_ms=${pct(99).toFixed(0)} late_max_ms=${sorted[sorted.length - 1].toFixed(0)}`,
);
process.exit(0);
