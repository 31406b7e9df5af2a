-- wrk script: POST a rotating set of image bodies; print exact latency percentiles as JSON.
-- BENCH_BODIES: a directory of files named 0.bin, 1.bin, ... (the request bodies)
-- BENCH_COUNT: how many; BENCH_PATH: the URL path; BENCH_TYPE: the Content-Type
-- An optional i.headers file beside i.bin adds "Name: value" lines as headers of that request.
-- BENCH_PACE_MS (optional): each connection waits a random time of this mean (exponential)
-- after each answer, so that the offered load is paced rather than as fast as answers come.
local dir = os.getenv("BENCH_BODIES")
local count = tonumber(os.getenv("BENCH_COUNT"))
local path = os.getenv("BENCH_PATH") or "/classify"
local content_type = os.getenv("BENCH_TYPE") or "image/png"
local prepared = {}
local index = 0

function init(args)
  for i = 0, count - 1 do
    local file = assert(io.open(dir .. "/" .. i .. ".bin", "rb"))
    local body = file:read("*all")
    file:close()
    local headers = { ["Content-Type"] = content_type }
    local extra = io.open(dir .. "/" .. i .. ".headers", "r")
    if extra then
      for name, value in extra:read("*all"):gmatch("([^:\n]+):%s*([^\n]+)") do
        headers[name] = value
      end
      extra:close()
    end
    prepared[i + 1] = wrk.format("POST", path, headers, body)
  end
  index = math.random(count)
end

local pace = tonumber(os.getenv("BENCH_PACE_MS") or "")
if pace then
  function delay()
    return -pace * math.log(1 - math.random())
  end
end

function request()
  index = index % count + 1
  return prepared[index]
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "non_2xx": %d, "socket_errors": %d, ' ..
    '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, errors.status,
    errors.connect + errors.read + errors.write + errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
