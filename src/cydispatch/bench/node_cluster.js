// Node's cluster serving what cydispatch's built-in app serves, for
// `cydispatch bench --peers node`: the design cydispatch started from, run the
// way its users run it.  The primary accepts and hands connections to the
// workers round robin (cluster.SCHED_RR, Node's default on Linux).
// Node is on the benchmark machine for comparison only: nothing in cydispatch
// depends on it.
"use strict";
const cluster = require("node:cluster");
const http = require("node:http");

const port = Number(process.env.PORT);
const workers = Number(process.env.WORKERS);
cluster.schedulingPolicy = cluster.SCHED_RR;

if (cluster.isPrimary) {
  for (let i = 0; i < workers; i++) cluster.fork();
  cluster.on("exit", (worker, code, signal) => {
    if (!stopping) cluster.fork();
  });
  let stopping = false;
  process.on("SIGTERM", () => {
    stopping = true;
    for (const id in cluster.workers) cluster.workers[id].process.kill("SIGTERM");
    process.exit(0);
  });
} else {
  const hello = Buffer.from(`Hello from Worker ${process.pid}`);
  const headers = { "Content-Type": "text/plain", "Content-Length": hello.length };
  http.createServer((req, res) => {
    if (req.url.startsWith("/slow")) {
      // Burns CPU like the built-in app's /slow?ms=N.
      const ms = Number(new URL(req.url, "http://x").searchParams.get("ms") || 0);
      const until = Date.now() + ms;
      while (Date.now() < until);
    }
    res.writeHead(200, headers);
    res.end(hello);
  }).listen(port, "127.0.0.1");
}
