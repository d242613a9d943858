-- The wrk script of the benchmark harness (bench/load.ts writes its input and reads its output).
--
--   wrk -t1 -c16 -d10s -s bench/load.lua http://127.0.0.1:PORT -- REQUESTS_FILE NONCE THREADS
--
-- REQUESTS_FILE holds the requests to send in turn, each as a line "METHOD PATH_BYTES HEADER_BYTES
-- BODY_BYTES" followed by the path, the header lines ("Name: value\n") and the body. A body may
-- contain the 20-byte MARKER: each request then gets a value of the same length no request of
-- the run repeats (NONCE, the thread's letter and a counter), e.g. a user nobody else asks for.
-- A single request without the marker is handed to wrk as its static request (no Lua per
-- request at all). With several threads (THREADS), each sends its own share of the requests.
--
-- done() prints one line "MXKEYS_WRK {json}": requests, 2xx and non-2xx answers, socket errors,
-- duration, latency (microseconds) and how many requests the script built. wrk itself counts
-- answers with a status above 399 (summary.errors.status), which costs nothing per answer; with
-- MXKEYS_WRK_STATUSES=1 in the environment the script also counts every status in a response()
-- callback, which makes wrk read every answer body into Lua (measured ~2.5x wrk's CPU per
-- answer for 130 KB answers), so it is off by default.

local MARKER = "@@@MXKEYS-UNIQUE@@@@"

local threads = {}
local nextThread = 0

function setup(thread)
  thread:set("index", nextThread)
  thread:set("letter", string.char(97 + nextThread % 26))
  nextThread = nextThread + 1
  table.insert(threads, thread)
end

local function readRequests(file)
  local f = assert(io.open(file, "rb"), "cannot open the requests file " .. tostring(file))
  local data = f:read("*a")
  f:close()
  local out = {}
  local pos = 1
  while pos <= #data do
    local lineEnd = string.find(data, "\n", pos, true)
    local method, pathLen, headersLen, bodyLen = string.match(string.sub(data, pos, lineEnd - 1), "^(%S+) (%d+) (%d+) (%d+)$")
    assert(method, "malformed requests file at byte " .. pos)
    pos = lineEnd + 1
    local path = string.sub(data, pos, pos + pathLen - 1)
    pos = pos + pathLen
    local headers = {}
    for name, value in string.gmatch(string.sub(data, pos, pos + headersLen - 1), "([^:\n]+): ([^\n]*)\n") do
      headers[name] = value
    end
    pos = pos + headersLen
    local body = string.sub(data, pos, pos + bodyLen - 1)
    pos = pos + bodyLen
    table.insert(out, { method = method, path = path, headers = headers, body = body })
  end
  return out
end

-- Per thread (each thread runs its own copy of this script).
local raw = {}      -- fully built requests, or { before, after } around the marker
local count = 0
local nonce = ""
local stride = 1
sent = 0

function init(args)
  local requests = readRequests(args[1])
  nonce = (args[2] or "") .. (letter or "a")
  assert(#nonce + 11 == #MARKER, "the nonce must be " .. (#MARKER - 11) .. " characters")
  if #requests == 1 and not string.find(requests[1].body, MARKER, 1, true) then
    local r = requests[1]
    wrk.method, wrk.path, wrk.body = r.method, r.path, r.body
    for name, value in pairs(r.headers) do wrk.headers[name] = value end
    request = nil
    sent = -1 -- static: wrk sends the one request; nothing to count here
    return
  end
  for i, r in ipairs(requests) do
    local text = wrk.format(r.method, r.path, r.headers, r.body)
    local at = string.find(text, MARKER, 1, true)
    if at then
      raw[i] = { string.sub(text, 1, at - 1), string.sub(text, at + #MARKER) }
    else
      raw[i] = text
    end
  end
  count = #raw
  -- With several threads, thread k sends requests k+1, k+1+THREADS, …: none sends another's.
  stride = tonumber(args[3] or "1")
end

function request()
  local r = raw[(sent * stride + (index or 0)) % count + 1]
  sent = sent + 1
  if type(r) == "table" then
    return r[1] .. nonce .. string.format("%011d", sent) .. r[2]
  end
  return r
end

if os.getenv("MXKEYS_WRK_STATUSES") == "1" then
  statuses = {}
  function response(status, headers, body)
    statuses[status] = (statuses[status] or 0) + 1
  end
end

function done(summary, latency, requests)
  local built, records = 0, 0
  local byStatus = {}
  for _, t in ipairs(threads) do
    built = built + (t:get("sent") or 0)
    local s = t:get("statuses")
    if s then
      for status, n in pairs(s) do byStatus[status] = (byStatus[status] or 0) + n end
    end
  end
  local parts = {}
  for status, n in pairs(byStatus) do table.insert(parts, string.format('"%d":%d', status, n)) end
  local e = summary.errors
  io.write(string.format(
    'MXKEYS_WRK {"requests":%d,"non2xx":%d,"connect":%d,"read":%d,"write":%d,"timeout":%d,"durationUs":%d,' ..
    '"latencyUs":{"mean":%.1f,"p50":%d,"p90":%d,"p99":%d,"max":%d},"built":%d,"statuses":{%s}}\n',
    summary.requests, e.status, e.connect, e.read, e.write, e.timeout, summary.duration,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    built, table.concat(parts, ",")))
end
