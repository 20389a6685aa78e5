#!/usr/bin/env python
"""Mutation testing of one part of ddpmkit with mutmut, against that part's own test files.

    python scripts/mutation.py TARGET [--tests TEST ...] [--sample N] [--seed S]

TARGET is a source file or folder (a folder means its .py files), e.g. src/ddpmkit/samplers.py or
src/ddpmkit/distill. Without --tests the test files come from DEFAULT_TESTS below. Needs the
`mutation` extra (pip install -e .[mutation]). docs/mutation.md explains the numbers.

Everything happens in a fresh temporary copy of src/, tests/ and the folders the tests read, with a
pyproject.toml whose [tool.mutmut] section this script writes: the working tree is never mutated
and nothing is left in it. Steps:

1. generate the mutants of TARGET (mutmut's own generator) and list their names;
2. keep all of them, or a seeded random sample of N (--sample) -- the sample is reproducible
   from (--seed, the source), and its names are printed;
3. `mutmut run NAMES...` with one worker (--max-children): each mutant runs the selected tests
   that execute its function (mutmut's per-test coverage), fastest first, stopping at the first
   failure;
4. print a table (file, generated, run, killed, survived, no tests, timeout/other, kill rate),
   the surviving mutants' names and, with --show, their diffs (`mutmut show`).

mutmut 3 does not mutate decorated functions. A @torch.no_grad() or @torch.inference_mode()
decorator is only a context, so in the copy it is moved below the function
(`f = torch.no_grad()(f)`, same behaviour) and the function is mutated too; --keep-decorators
turns this off.

Run it with one thread per process on a shared machine:
    DDPMKIT_TEST_THREADS=1 OMP_NUM_THREADS=1 python scripts/mutation.py src/ddpmkit/losses.py
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Each target's own tests. A test id (file::test) selects one test of a file that is mostly about
# something else.
DEFAULT_TESTS = {
    "src/ddpmkit/distill": ["tests/test_distill.py"],
    "src/ddpmkit/guidance": ["tests/test_conditioning.py"],
    "src/ddpmkit/compress/prune.py": ["tests/test_compress.py"],
    "src/ddpmkit/latent.py": ["tests/test_latent.py"],
    "src/ddpmkit/models/adm.py": ["tests/test_backbone.py"],
    "src/ddpmkit/samplers.py": ["tests/test_samplers.py", "tests/test_diffusion.py"],
    "src/ddpmkit/losses.py": [
        "tests/test_objectives.py",
        "tests/test_train.py::test_loss_takes_explicit_draws_and_a_rank_gets_its_rows_of_the_global_draw",
    ],
}

# Copied next to src/ and tests/ when present: tests read files from them.
ALSO_COPY = ["benchmarks", "examples", "notebooks"]

UNWRAP = re.compile(r"^torch\.(no_grad|inference_mode|enable_grad)\(\)$")

# mutmut's exit-code classes (mutmut.stats.status_by_exit_code) folded into the table's columns.
COLUMN = {"killed": "killed", "survived": "survived", "no tests": "no tests", "timeout": "timeout/other",
          "suspicious": "timeout/other", "segfault": "timeout/other", "caught by type check": "killed",
          "skipped": "timeout/other", "check was interrupted by user": "timeout/other",
          "not checked": "timeout/other"}

# A pytest plugin loaded into every test run mutmut makes. It orders the tests fastest first
# (durations from mutmut's stats run), so a mutant that some quick test kills does not wait for the
# slow ones (mutmut runs pytest with -x), and it logs each run: the mutant, its wall time, how many
# tests ran and the first that failed (the one that killed it). mutmut's forkserver mode records
# no durations of its own.
ORDER_PLUGIN = '''\
import json
import os
import time

_start, _ran, _failed = [0.0], [0], []


def pytest_collection_modifyitems(session, config, items):
    try:
        with open("mutmut-stats.json") as f:
            durations = json.load(f)["duration_by_test"]
    except (OSError, ValueError, KeyError):
        return
    items.sort(key=lambda item: durations.get(item.nodeid, 0.0))


def pytest_sessionstart(session):
    _start[0], _ran[0] = time.time(), 0
    _failed.clear()


def pytest_runtest_logreport(report):
    if report.when == "call":
        _ran[0] += 1
    if report.failed and not _failed:
        _failed.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    log = os.environ.get("DDPMKIT_MUTATION_LOG")
    if log and not session.config.getoption("collectonly"):
        with open(log, "a") as f:
            f.write(json.dumps({"mutant": os.environ.get("MUTANT_UNDER_TEST", ""), "seconds": time.time() - _start[0],
                                "tests": _ran[0], "failed": _failed[0] if _failed else None}) + "\\n")
'''


def target_files(target: Path) -> list[Path]:
    """The .py files TARGET names, relative to the repository root."""
    path = (ROOT / target).resolve()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.py") if "__pycache__" not in p.parts)
    elif path.suffix == ".py" and path.is_file():
        files = [path]
    else:
        sys.exit(f"mutation.py: {target} is neither a .py file nor a folder")
    rel = [p.relative_to(ROOT) for p in files]
    if not rel or rel[0].parts[:2] != ("src", "ddpmkit"):
        sys.exit(f"mutation.py: {target} is not under src/ddpmkit")
    return rel


def default_tests(target: Path) -> list[str]:
    key = str((ROOT / target).resolve().relative_to(ROOT)).rstrip("/")
    if key not in DEFAULT_TESTS:
        sys.exit(f"mutation.py: no default tests for {key}; pass --tests (defaults: {', '.join(DEFAULT_TESTS)})")
    return DEFAULT_TESTS[key]


def unwrap_decorators(path: Path) -> int:
    """Move each lone @torch.no_grad() / @torch.inference_mode() below its function as
    `name = torch.no_grad()(name)`: the same function at run time, but one mutmut will mutate."""
    source = path.read_text()
    lines = source.splitlines(keepends=True)
    edits = []  # (decorator line index, line index after the function, indent, name, decorator)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and len(node.decorator_list) == 1:
            deco = node.decorator_list[0]
            text = ast.get_source_segment(source, deco)
            if text and UNWRAP.match(text) and deco.lineno == deco.end_lineno:
                indent = lines[deco.lineno - 1][: len(lines[deco.lineno - 1]) - len(lines[deco.lineno - 1].lstrip())]
                edits.append((deco.lineno - 1, node.end_lineno, indent, node.name, text))
    for deco_line, after, indent, name, text in sorted(edits, reverse=True):
        lines.insert(after, f"{indent}{name} = {text}({name})\n")
        del lines[deco_line]
    if edits:
        path.write_text("".join(lines))
    return len(edits)


def make_copy(work: Path, files: list[Path], tests: list[str], keep_decorators: bool) -> int:
    """The isolated project mutmut runs in; returns how many decorators were unwrapped."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc", ".pytest_cache")
    shutil.copytree(ROOT / "src", work / "src", ignore=ignore)
    shutil.copytree(ROOT / "tests", work / "tests", ignore=ignore)
    also = [name for name in ALSO_COPY if (ROOT / name).is_dir()]
    for name in also:
        shutil.copytree(ROOT / name, work / name, ignore=ignore)
    unwrapped = 0 if keep_decorators else sum(unwrap_decorators(work / f) for f in files)

    pyproject = (ROOT / "pyproject.toml").read_text()
    if re.search(r"^\[tool\.mutmut\]", pyproject, re.M):
        sys.exit("mutation.py: pyproject.toml has its own [tool.mutmut]; this script writes that section itself")
    section = {
        "source_paths": ["src"],
        "only_mutate": [str(f) for f in files],
        "pytest_add_cli_args_test_selection": tests,
        "pytest_add_cli_args": ["-p", "no:cacheprovider", "-p", "ddpmkit_mutation_order"],
        "also_copy": also,
        "process_isolation": "forkserver",
        "use_git_change_detection": False,
    }
    body = "\n".join(f"{key} = {json.dumps(value)}" for key, value in section.items())
    (work / "pyproject.toml").write_text(pyproject.rstrip() + "\n\n[tool.mutmut]\n" + body + "\n")

    plugins = work / "_plugins"
    plugins.mkdir()
    (plugins / "ddpmkit_mutation_order.py").write_text(ORDER_PLUGIN)
    return unwrapped


def environment(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    # The copy's mutated package (and the ordering plugin) ahead of the editable install's src/,
    # also for any subprocess a test starts.
    env["PYTHONPATH"] = os.pathsep.join([str(work / "mutants" / "src"), str(work / "_plugins")])
    env["DDPMKIT_MUTATION_LOG"] = str(work / "runs.jsonl")
    env.setdefault("DDPMKIT_TEST_THREADS", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    env.setdefault("PYTHONHASHSEED", "0")
    return env


GENERATE = """
import os
from pathlib import Path
import mutmut.__main__ as m
from mutmut.mutation.data import SourceFileMutationData
from mutmut.utils.file_utils import walk_mutatable_files
import json
os.makedirs("mutants", exist_ok=True)
m.copy_src_dir()
m.copy_also_copy_files()
m.create_mutants(1)
names = {}
for path in walk_mutatable_files():
    data = SourceFileMutationData(path=path)
    data.load()
    names[str(path)] = list(data.exit_code_by_key)
print("MUTANT-NAMES " + json.dumps(names))
"""


def generate(work: Path, env: dict[str, str]) -> dict[str, list[str]]:
    """Mutant names per file, from mutmut's generator (no tests run)."""
    out = subprocess.run([sys.executable, "-c", GENERATE], cwd=work, env=env, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("MUTANT-NAMES "):
            return json.loads(line[len("MUTANT-NAMES "):])
    sys.exit(f"mutation.py: generating mutants failed\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def results(work: Path, env: dict[str, str]) -> dict[str, str]:
    """mutant name -> mutmut status, for every mutant (run or not)."""
    out = subprocess.run(["mutmut", "results", "--all", "true"], cwd=work, env=env, capture_output=True, text=True)
    status = {}
    for line in out.stdout.splitlines():
        name, sep, value = line.strip().rpartition(": ")
        if sep:
            status[name] = value
    return status


def test_runs(work: Path) -> dict[str, dict]:
    """mutant name ("stats", "fail", "" for the clean run) -> the plugin's record of its last test run."""
    runs = {}
    log = work / "runs.jsonl"
    if log.is_file():
        for line in log.read_text().splitlines():
            record = json.loads(line)
            runs[record["mutant"]] = record
    return runs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", type=Path, help="a source file or folder under src/ddpmkit")
    p.add_argument("--tests", nargs="+", help="test files or ids to run (default: the target's own, see DEFAULT_TESTS)")
    p.add_argument("--sample", type=int, help="run a seeded random sample of this many mutants (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    p.add_argument("--mutants", nargs="+", help="run exactly these mutant names (e.g. a previous run's survivors)")
    p.add_argument("--max-children", type=int, default=1, help="parallel mutmut workers (default 1)")
    p.add_argument("--show", action="store_true", help="print the diff of every surviving mutant")
    p.add_argument("--list", action="store_true", help="only generate and list the mutant names, run nothing")
    p.add_argument("--json", type=Path, help="also write the results (statuses, table, timings) to this file")
    p.add_argument("--keep", action="store_true", help="keep the temporary copy (for `mutmut show` / `mutmut browse`)")
    p.add_argument("--keep-decorators", action="store_true",
                   help="leave @torch.no_grad()/@torch.inference_mode() functions unmutated, as mutmut does")
    args = p.parse_args(argv)

    if shutil.which("mutmut") is None:
        sys.exit("mutation.py: mutmut is not installed; pip install -e '.[mutation]'")
    files = target_files(args.target)
    tests = args.tests or default_tests(args.target)
    for t in tests:
        if not (ROOT / t.split("::")[0]).is_file():
            sys.exit(f"mutation.py: no test file {t.split('::')[0]}")

    start = time.time()
    work = Path(tempfile.mkdtemp(prefix="ddpmkit-mutation-"))
    try:
        unwrapped = make_copy(work, files, tests, args.keep_decorators)
        env = environment(work)
        names_by_file = generate(work, env)
        generated = [n for names in names_by_file.values() for n in names]
        print(f"target {args.target}: {len(files)} file(s), {len(generated)} mutants generated"
              f"{f', {unwrapped} torch.no_grad/inference_mode function(s) unwrapped' if unwrapped else ''}")
        print(f"tests: {' '.join(tests)}")

        if args.mutants:
            unknown = sorted(set(args.mutants) - set(generated))
            if unknown:
                sys.exit(f"mutation.py: not mutants of {args.target}: {' '.join(unknown)}")
            chosen = list(args.mutants)
        elif args.sample is not None and args.sample < len(generated):
            # A seeded shuffle, then the first N: a larger --sample with the same seed only adds mutants.
            order = sorted(generated)
            random.Random(args.seed).shuffle(order)
            chosen = sorted(order[: args.sample])
            print(f"sample: {len(chosen)} of {len(generated)} (seed {args.seed})")
        else:
            chosen = sorted(generated)
        if args.list:
            print("\n".join(chosen))
            return 0

        run_start = time.time()
        cmd = ["mutmut", "run", "--max-children", str(args.max_children), *chosen]
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
        run_wall = time.time() - run_start
        if proc.returncode != 0:
            print(proc.stdout[-5000:], proc.stderr[-5000:], sep="\n")
            print(f"mutation.py: mutmut run exited with {proc.returncode}")
            return proc.returncode

        status = results(work, env)
        runs = test_runs(work)
        took = {n: runs[n]["seconds"] for n in chosen if n in runs}
        rows = []
        chosen_set = set(chosen)
        for path, names in names_by_file.items():
            run = [n for n in names if n in chosen_set]
            counts = Counter(COLUMN.get(status.get(n, "not checked"), "timeout/other") for n in run)
            rate = counts["killed"] / len(run) if run else float("nan")
            rows.append({"file": path, "generated": len(names), "run": len(run), "killed": counts["killed"],
                         "survived": counts["survived"], "no tests": counts["no tests"],
                         "timeout/other": counts["timeout/other"], "kill rate": rate})
        survivors = [n for n in chosen if COLUMN.get(status.get(n, "not checked")) != "killed"]

        cols = ["file", "generated", "run", "killed", "survived", "no tests", "timeout/other", "kill rate"]
        print()
        print("| " + " | ".join(cols) + " |")
        print("|" + "|".join("---" for _ in cols) + "|")
        for r in rows:
            cells = [r["file"]] + [str(r[c]) for c in cols[1:-1]] + [f"{100 * r['kill rate']:.0f}%"]
            print("| " + " | ".join(cells) + " |")
        per_mutant = sum(took.values())
        setup = sum(runs[k]["seconds"] for k in ("stats", "", "fail") if k in runs)
        print(f"\nwall time {time.time() - start:.0f} s; mutmut run {run_wall:.0f} s: the mutants' test runs "
              f"{per_mutant:.0f} s ({per_mutant / max(len(took), 1):.1f} s each, longest {max(took.values(), default=0):.0f} s), "
              f"mutmut's stats, clean and forced-fail runs {setup:.0f} s")
        if survivors:
            print(f"\nnot killed ({len(survivors)}):")
            for n in survivors:
                print(f"    {n}: {status.get(n)} ({took.get(n, 0.0):.0f} s)")
            print(f"\nrerun them: python scripts/mutation.py {args.target} --tests {' '.join(tests)} --mutants "
                  + " ".join(f"'{n}'" for n in survivors))
        if args.show:
            for n in survivors:
                out = subprocess.run(["mutmut", "show", n], cwd=work, env=env, capture_output=True, text=True)
                print("\n" + out.stdout.rstrip())
        if args.json:
            args.json.write_text(json.dumps({
                "target": str(args.target), "tests": tests, "seed": args.seed, "sample": args.sample,
                "generated": generated, "run": chosen, "status": {n: status.get(n) for n in chosen},
                "table": rows, "wall_s": time.time() - start, "mutmut_run_s": run_wall,
                "test_runs": runs,
            }, indent=1))
        return 0
    finally:
        if args.keep:
            print(f"\nkept the copy: cd {work} && PYTHONPATH={work / 'mutants' / 'src'}:{work / '_plugins'} mutmut show NAME")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
