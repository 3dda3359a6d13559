-- One wrk script for every cydispatch workload, configured by arguments
-- after `--` on the wrk command line:
--
--   close=1           every request carries `Connection: close`, so wrk opens
--                     a new connection per request
--   slow_every=N      one request in N (counted per wrk thread) is
--   slow_path=P       `GET P` (default /slow?ms=20) instead of the URL's path
--   count_workers=1   count the worker pid in each `Hello from Worker <pid>`
--
-- done() prints one line, CYDISPATCH_WRK_JSON {...}, which wrk.py parses.
--
-- Each wrk thread runs this file in its own Lua state and calls init(args)
-- there; setup() and done() run in a separate main state.  wrk decides once,
-- after the first thread's init(), whether to call request() per request and
-- whether to parse response bodies for response(): it checks if those globals
-- are functions.  So they are defined inside init(), only when a workload
-- needs them; the common case sends wrk's precomputed request and leaves
-- bodies unparsed, which keeps the load generator cheap.

local MARKER = "CYDISPATCH_WRK_JSON "

local threads = {}

function setup(thread)
   threads[#threads + 1] = thread
end

function init(args)
   -- args[0] is the URL; ipairs starts at our first name=value.
   local options = {}
   for _, arg in ipairs(args) do
      local name, value = arg:match("^([%w_]+)=(.*)$")
      if not name then
         error("wrk.lua: expected name=value after --, got " .. arg)
      end
      options[name] = value
   end

   if options.close == "1" then
      -- wrk.format() reads wrk.headers, and wrk.init() formats the
      -- default request after this function returns.
      wrk.headers["Connection"] = "close"
   end

   local slow_every = tonumber(options.slow_every or "0")
   if slow_every > 0 then
      local regular = wrk.format()
      local slow = wrk.format("GET", options.slow_path or "/slow?ms=20")
      local sent = 0
      function request()
         sent = sent + 1
         if sent == slow_every then
            sent = 0
            return slow
         end
         return regular
      end
   end

   if options.count_workers == "1" then
      -- A global, so that done() can fetch it with thread:get().
      responses_by_worker = {}
      function response(status, headers, body)
         local pid = body:match("^Hello from Worker (%d+)")
         if pid then
            responses_by_worker[pid] = (responses_by_worker[pid] or 0) + 1
         end
      end
   end
end

-- JSON by hand: wrk has no JSON library.  Every table is written as an
-- object (so an empty one is `{}`); keys are our own field names and pids,
-- which need no escaping.
local function json(value)
   if type(value) == "table" then
      local keys = {}
      for key in pairs(value) do
         keys[#keys + 1] = key
      end
      table.sort(keys)
      local members = {}
      for i, key in ipairs(keys) do
         members[i] = string.format('"%s":%s', key, json(value[key]))
      end
      return "{" .. table.concat(members, ",") .. "}"
   end
   if value ~= value or value == math.huge or value == -math.huge then
      return "null"
   end
   return string.format("%.14g", value)
end

function done(summary, latency, requests)
   local workers = {}
   for _, thread in ipairs(threads) do
      local counts = thread:get("responses_by_worker") or {}
      for pid, count in pairs(counts) do
         workers[pid] = (workers[pid] or 0) + count
      end
   end
   io.write(MARKER, json({
      requests = summary.requests,
      duration_us = summary.duration,
      bytes = summary.bytes,
      errors = summary.errors,
      latency_us = {
         p50 = latency:percentile(50),
         p90 = latency:percentile(90),
         p99 = latency:percentile(99),
         p99_9 = latency:percentile(99.9),
         max = latency.max,
         mean = latency.mean,
         stdev = latency.stdev,
      },
      workers = workers,
   }), "\n")
end
