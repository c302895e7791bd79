"""Collects <dir>/<name>.json (last JSON line a benchmark printed) + <dir>/<name>.time (/usr/bin/time -v) into
<dir>/summary.json and a markdown table on stdout. Peak RSS is /usr/bin/time's "Maximum resident set size"
for every system (same method for all)."""
import json
import re
import sys
from pathlib import Path

d = Path(sys.argv[1])
order = [l.strip() for l in (d / "order.txt").read_text().splitlines() if l.strip()]
rows = []
for name in order:
    text = (d / f"{name}.json").read_text() if (d / f"{name}.json").exists() else ""
    objs = []
    for l in text.splitlines():
        try:
            o = json.loads(l)
        except ValueError:
            continue
        if isinstance(o, dict) and "tokens_per_s" in o:
            objs.append(o)
    t = (d / f"{name}.time").read_text() if (d / f"{name}.time").exists() else ""
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", t)
    rss = int(m.group(1)) / 2**20 if m else None
    if not objs:
        rows.append({"name": name, "error": "no result", "peak_rss_gib": rss})
        continue
    o = objs[-1]
    med = o["step_time_s"]["median"] if "step_time_s" in o else o["step_time_median_s"]
    rows.append({"name": name, "step_time_median_s": med, "tokens_per_s": o["tokens_per_s"],
                 "token_occupancy": o.get("token_occupancy"), "peak_rss_gib": rss,
                 "split_s_per_step": o.get("split_s_per_step"), "raw": o})
(d / "summary.json").write_text(json.dumps(rows, indent=1))
print("| run | step time median (s) | real tokens/s | occupancy | peak RSS (GiB) |")
print("|---|---:|---:|---:|---:|")
for r in rows:
    if "error" in r:
        print(f"| {r['name']} | failed | | | |")
        continue
    occ = f"{r['token_occupancy']:.1%}" if r["token_occupancy"] is not None else ""
    print(f"| {r['name']} | {r['step_time_median_s']:.2f} | {r['tokens_per_s']:.1f} | {occ} | {r['peak_rss_gib']:.2f} |")
print()
print("| run | reference_forward | policy_forward | backward | optimizer (s/step) |")
print("|---|---:|---:|---:|---:|")
for r in rows:
    s = r.get("split_s_per_step")
    if s:
        print(f"| {r['name']} | {s['reference_forward']:.2f} | {s['policy_forward']:.2f} | {s['backward']:.2f} | {s['optimizer']:.2f} |")
