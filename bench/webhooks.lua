-- wrk script for bench/webhooks.py: posts a Pipedrive webhook body, each request a different delivery.
--
-- Arguments after `--`: the body template, a run number, the Authorization header, and `same` to send one
-- delivery over and over instead. The template is a Pipedrive body whose event id, deal id and person id
-- read @EVENT@, @DEAL@ and @PERSON@; each request fills them from (run, thread, request count), so no two
-- requests of any run are the same delivery. At the end one line `RESULT {json}` gives the counts by
-- answer and the latency percentiles.

local threads = {}

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

local pieces, run, same, headers
local sent = 0
new, duplicate, refused = 0, 0, 0

function init(args)
  local file = assert(io.open(args[1], "rb"))
  local template = file:read("*a")
  file:close()
  run = tonumber(args[2])
  headers = {["Content-Type"] = "application/json", ["Authorization"] = args[3]}
  same = args[4] == "same"
  -- Split once, so a request is a concatenation rather than three searches through 18 KB.
  pieces = {}
  local rest = template
  while true do
    local at, stop, name = rest:find("@(%u+)@")
    if not at then break end
    table.insert(pieces, rest:sub(1, at - 1))
    table.insert(pieces, name)
    rest = rest:sub(stop + 1)
  end
  table.insert(pieces, rest)
end

function request()
  local n = same and 0 or sent
  sent = sent + 1
  -- Deal and person ids: distinct for every (run, thread, request) while under a million a thread.
  local number = string.format("%d", run * 100000000 + tid * 1000000 + n)
  local values = {EVENT = "bench-" .. number, DEAL = number, PERSON = number}
  local body = {}
  for i, piece in ipairs(pieces) do
    body[i] = (i % 2 == 0) and values[piece] or piece
  end
  return wrk.format("POST", "/webhooks/pipedrive", headers, table.concat(body))
end

function response(status, _headers, _body)
  if status == 202 then
    new = new + 1
  elseif status == 200 then
    duplicate = duplicate + 1
  else
    refused = refused + 1
  end
end

function done(summary, latency, _requests)
  local counts = {new = 0, duplicate = 0, refused = 0}
  for _, thread in ipairs(threads) do
    for name in pairs(counts) do
      counts[name] = counts[name] + thread:get(name)
    end
  end
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests": %d, "seconds": %.3f, "new": %d, "duplicate": %d, "refused": %d, '
      .. '"socket_errors": %d, "p50_ms": %.3f, "p99_ms": %.3f, "max_ms": %.3f}\n',
    summary.requests, summary.duration / 1e6, counts.new, counts.duplicate, counts.refused,
    e.connect + e.read + e.write + e.timeout,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000
  ))
end
