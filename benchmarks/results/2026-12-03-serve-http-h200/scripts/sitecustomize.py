# A poor man's sampling profiler for every Python process started with PYSAMPLE_DIR set (sitecustomize: the
# server, the spawned engine process and the client processes alike). Counts, per thread name, the leaf and the
# inclusive functions of sampled stacks; rewrites DIR/<pid>.json every few seconds.
import os
if os.environ.get("PYSAMPLE_DIR"):
    import collections, json, sys, threading, time
    _dir = os.environ["PYSAMPLE_DIR"]
    _every = float(os.environ.get("PYSAMPLE_EVERY", "0.004"))
    _leaf = collections.defaultdict(collections.Counter)
    _incl = collections.defaultdict(collections.Counter)
    _stack = collections.defaultdict(collections.Counter)
    _n = collections.Counter()

    def _name(f):
        c = f.f_code
        return f"{os.path.basename(c.co_filename)}:{c.co_name}"

    def _dump():
        out = {"pid": os.getpid(), "argv": sys.argv[:3], "threads": {}}
        for t, n in _n.items():
            out["threads"][t] = {"samples": n, "leaf": _leaf[t].most_common(40), "inclusive": _incl[t].most_common(60),
                                 "stacks": _stack[t].most_common(25)}
        tmp = f"{_dir}/{os.getpid()}.json.tmp"
        with open(tmp, "w") as fh:
            json.dump(out, fh)
        os.replace(tmp, f"{_dir}/{os.getpid()}.json")

    def _run():
        me = threading.get_ident()
        last = time.monotonic()
        while True:
            time.sleep(_every)
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, f in sys._current_frames().items():
                if ident == me:
                    continue
                t = names.get(ident, str(ident))
                _n[t] += 1
                _leaf[t][_name(f)] += 1
                seen, chain = set(), []
                while f is not None:
                    n = _name(f)
                    if n not in seen:
                        seen.add(n)
                        _incl[t][n] += 1
                    if len(chain) < 8:
                        chain.append(n)
                    f = f.f_back
                _stack[t][" < ".join(chain)] += 1
            if time.monotonic() - last > 3:
                last = time.monotonic()
                try:
                    _dump()
                except Exception:
                    pass

    os.makedirs(_dir, exist_ok=True)
    threading.Thread(target=_run, name="pysample", daemon=True).start()
    import atexit
    atexit.register(lambda: _dump())
