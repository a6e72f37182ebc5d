-- wrk script for benches/load.sh.
--   BENCH_TOKEN=<jwt>        every request carries this one token (a pipeline's repeated calls)
--   BENCH_TOKENS=<file>      one token per line; each request takes the next (distinct tokens)
--   neither                  no Authorization header
-- `done` prints one machine-readable line: requests, p50/p99 in µs, non-2xx, socket errors.
local tokens = nil
local n, i = 0, 0

local single = os.getenv("BENCH_TOKEN")
if single and single ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. single
end

local file = os.getenv("BENCH_TOKENS")
if file and file ~= "" then
  tokens = {}
  for line in io.lines(file) do
    if #line > 0 then
      n = n + 1
      tokens[n] = "Bearer " .. line
    end
  end
  request = function()
    i = i + 1
    if i > n then i = 1 end
    return wrk.format(nil, nil, { ["Authorization"] = tokens[i] })
  end
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH requests=%d p50_us=%d p99_us=%d non2xx=%d sockerr=%d duration_us=%d\n",
    summary.requests, latency:percentile(50), latency:percentile(99), e.status,
    e.connect + e.read + e.write + e.timeout, summary.duration))
end
