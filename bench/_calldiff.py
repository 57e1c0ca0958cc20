import json, os, subprocess, sys, pstats
from bench.common import SiteProcess, ADDON_PACK
BASE = {"CONCURRENT_REQUESTS": 16, "CONCURRENT_REQUESTS_PER_DOMAIN": 16}
extra = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
with SiteProcess("--pages", "10", "--items-per-page", "100") as site:
    for name, st in (("plain", {}), ("addon", {**ADDON_PACK, **extra})):
        spec = {"start_url": site.start_url, "settings": {**BASE, **st}, "window": 300}
        subprocess.run([sys.executable, "-m", "bench.common", json.dumps(spec)], capture_output=True, env={**os.environ, "BENCH_CPROFILE": f"/tmp/perf_{name}.prof"})
a = pstats.Stats("/tmp/perf_plain.prof").stats
b = pstats.Stats("/tmp/perf_addon.prof").stats
# edges: (caller, callee) -> ncalls
def edges(stats):
    e = {}
    for callee, (cc, nc, tt, ct, callers) in stats.items():
        for caller, v in callers.items():
            e[(caller, callee)] = v[1] if isinstance(v, tuple) else v
    return e
ea, eb = edges(a), edges(b)
rows = []
for k in set(ea) | set(eb):
    d = eb.get(k, 0) - ea.get(k, 0)
    if d > 500:
        rows.append((d, k))
def fmt(f): return "/".join(f[0].split("/")[-2:]) + f":{f[1]}:{f[2]}"
for d, (caller, callee) in sorted(rows, reverse=True)[:70]:
    print(f"{d/1010:6.2f}/req  {fmt(caller)} -> {fmt(callee)}")
