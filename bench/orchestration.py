#!/usr/bin/env python3
"""Orchestration overhead: a graph of 1,000 no-op tasks (10 layers of 100, each task after
two of the layer before) run by `weir run` (view models: nothing to compute, every task
still scheduled, recorded as running and finished in the SQLite state store) and by
Dagster (1,000 no-op ops in one job, in-process executor, SQLite-backed instance), in the
same run. Reports the time per task; weir's target is under 5 ms.

Usage: python3 bench/orchestration.py [--weir PATH] [--tasks-per-layer N] [--layers L] [--repeat K]
"""
import argparse, os, shutil, subprocess, sys, tempfile, time

def parents(layer, j, width):
    return [(layer - 1, j), (layer - 1, (j + 1) % width)]

def weir_project(root, layers, width):
    os.makedirs(os.path.join(root, "models"))
    with open(os.path.join(root, "weir.yaml"), "w") as f:
        f.write("name: overhead\nmodels: {materialized: view}\n")
    for l in range(layers):
        for j in range(width):
            if l == 0:
                sql = "select 1 as x"
            else:
                a, b = parents(l, j, width)
                sql = "select x from {{ ref('t_%d_%d') }} union all select x from {{ ref('t_%d_%d') }}" % (a + b)
            with open(os.path.join(root, "models", f"t_{l}_{j}.sql"), "w") as f:
                f.write(sql)

def run_weir(weir, root):
    t = time.perf_counter()
    out = subprocess.run([weir, "--project", root, "run", "--format", "json", "-q"],
                         capture_output=True, text=True)
    wall = time.perf_counter() - t
    if out.returncode != 0:
        sys.exit(f"weir failed: {out.stderr[-2000:]}")
    import json
    summary = json.loads(out.stdout)
    assert all(a["status"] == "succeeded" for a in summary["assets"]), "a task failed"
    return wall, len(summary["assets"])

DAGSTER = r'''
import sys, time, tempfile
t0 = time.perf_counter()
from dagster import job, op, In, Nothing, DagsterInstance
layers, width = int(sys.argv[1]), int(sys.argv[2])
def make(name, n_in):
    ins = {f"i{k}": In(Nothing) for k in range(n_in)}
    @op(name=name, ins=ins)
    def _op():
        return None
    return _op
ops = {}
@job
def overhead():
    for l in range(layers):
        for j in range(width):
            name = f"t_{l}_{j}"
            if l == 0:
                ops[(l, j)] = make(name, 0)()
            else:
                a, b = (l - 1, j), (l - 1, (j + 1) % width)
                ops[(l, j)] = make(name, 2)(i0=ops[a], i1=ops[b])
t1 = time.perf_counter()
with tempfile.TemporaryDirectory() as home:
    with DagsterInstance.local_temp(home) as instance:
        t2 = time.perf_counter()
        result = overhead.execute_in_process(instance=instance)
        t3 = time.perf_counter()
assert result.success
n = len([e for e in result.all_events if e.event_type_value == "STEP_SUCCESS"])
print(f"{t3 - t2:.3f} {t3 - t0:.3f} {n}")
'''

def run_dagster(layers, width):
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", DAGSTER, str(layers), str(width)],
                         capture_output=True, text=True)
    wall = time.perf_counter() - t
    if out.returncode != 0:
        print(f"dagster failed: {out.stderr[-1500:]}")
        return None
    execute, _, n = out.stdout.split()[-3:]
    return float(execute), wall, int(n)

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weir", default=os.path.expanduser("~/.cache/weir-target/release/weir"))
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--tasks-per-layer", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    tasks = a.layers * a.tasks_per_layer
    try:
        import dagster  # noqa: F401
        have_dagster = True
    except ImportError:
        have_dagster = False
    weir_best, dag_best = None, None
    for _ in range(a.repeat):
        d = tempfile.mkdtemp(prefix="weir-orch-")
        try:
            weir_project(d, a.layers, a.tasks_per_layer)
            wall, n = run_weir(a.weir, d)
            assert n == tasks, (n, tasks)
            weir_best = wall if weir_best is None else min(weir_best, wall)
        finally:
            shutil.rmtree(d, ignore_errors=True)
        if have_dagster:
            r = run_dagster(a.layers, a.tasks_per_layer)
            if r:
                assert r[2] == tasks, r
                dag_best = r if dag_best is None else min(dag_best, r)
    print(f"{tasks} no-op tasks ({a.layers} layers of {a.tasks_per_layer}), best of {a.repeat}")
    print(f"  weir run (whole command, SQLite store): {weir_best:7.2f} s  = {weir_best / tasks * 1000:6.2f} ms/task")
    if dag_best:
        ex, wall, _ = dag_best
        print(f"  dagster execute_in_process:             {ex:7.2f} s  = {ex / tasks * 1000:6.2f} ms/task")
        print(f"  dagster whole process (with imports):   {wall:7.2f} s  = {wall / tasks * 1000:6.2f} ms/task")
        print(f"  ratio weir / dagster (whole): {weir_best / wall:.3f}; weir / dagster (execute only): {weir_best / ex:.3f}")
    else:
        print("  dagster: not installed (pip install dagster)")

if __name__ == "__main__":
    main()
