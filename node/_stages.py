import time, json
S = {k: [] for k in "acdef"}
def rec(k, meta):
    t = meta.get("t")
    if t is None: return
    S[k].append((time.time_ns() - int(t)) / 1e6)
    if k == "f" and len(S["f"]) >= 5000:
        out = {}
        for kk, v in S.items():
            v.sort()
            if v: out[kk] = [round(v[len(v)//2],2), round(v[int(len(v)*.99)],2)]
            v.clear()
        with open("/tmp/stages.txt", "a") as f: f.write(json.dumps(out) + "\n")
