#!/usr/bin/env python3
"""RSS timeline of one command: VmRSS / RssAnon / RssFile every 0.25 s, interleaved with its log lines.

    python bench/rss_trace.py .venv/bin/python sdxl_train_network.py --fp8_base ... > trace.txt

A benchmark tool (issue 12): it found that --fp8_base kept the memory-mapped fp32 checkpoint resident
while quantizing (docs/benchmarks.md). Prints the peak first, then the timeline (a sample every 2 s).
"""
import subprocess, sys, time, threading
cmd = sys.argv[1:]
t0 = time.time()
p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
samples = []
def sample():
    while p.poll() is None:
        try:
            st = open(f"/proc/{p.pid}/status").read()
            v = {l.split(':')[0]: int(l.split()[1]) // 1024 for l in st.splitlines() if l.startswith(('VmRSS', 'RssAnon', 'RssFile', 'VmHWM'))}
            samples.append((time.time() - t0, v))
        except Exception:
            pass
        time.sleep(0.25)
th = threading.Thread(target=sample); th.start()
events = []
for line in p.stdout:
    for part in line.replace('\r', '\n').split('\n'):
        if part.strip() and ('INFO' in part or 'WARNING' in part or '100%' in part):
            events.append((time.time() - t0, part.strip()[:150]))
p.wait(); th.join()
peak = max(samples, key=lambda s: s[1].get('VmRSS', 0))
print(f"rc={p.returncode} peak VmRSS {peak[1]} at {peak[0]:.1f}s; HWM {samples[-1][1].get('VmHWM')}")
last = -10
merged = sorted([(t, 'S', v) for t, v in samples] + [(t, 'E', e) for t, e in events], key=lambda x: x[0])
for t, k, v in merged:
    if k == 'E':
        print(f"{t:7.1f}  {v}")
    elif t - last >= 2:
        print(f"{t:7.1f}  RSS {v.get('VmRSS')} anon {v.get('RssAnon')} file {v.get('RssFile')}"); last = t
