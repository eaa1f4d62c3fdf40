"""CI for the course exercises: the grader, run as a student or instructor runs it, must FAIL every shipped
template (because of its NotImplementedError stub, not because the grader broke) and PASS every reference
solution; the committed notebooks must be exactly what notebooks/exercises/_make_templates.py writes."""
import copy
import importlib.util
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EX_DIR = os.path.join(ROOT, "notebooks", "exercises")


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


EXERCISES = load("exercise_grader", os.path.join(ROOT, "tests", "exercises", "conftest.py")).EXERCISES
STEMS = {ex: f"{ex}_{name}" for ex, (name, _) in EXERCISES.items()}


def solved_notebook(ex):
    """The template of `ex` with the reference solution pasted into its SOLUTION cell, plus a code cell that
    would crash if the grader ran anything but solution cells."""
    nb = nbformat.read(os.path.join(EX_DIR, f"{STEMS[ex]}.ipynb"), as_version=4)
    nb = copy.deepcopy(nb)
    with open(os.path.join(EX_DIR, "solutions", f"{STEMS[ex]}.py")) as f:
        ref = f.read()
    for cell in nb.cells:
        if "solution" in cell.metadata.get("tags", []):
            cell.source = f"# SOLUTION {ex}\n{ref}"
    nb.cells.append(nbformat.v4.new_code_cell('raise RuntimeError("not a solution cell: never graded")'))
    return nb


def grade(args, junit):
    """Start the grader in a subprocess: python -m pytest tests/exercises ARGS. Third-party pytest plugins
    are not loaded (the grader needs none, and some take seconds to import)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "--tb=line", "-p", "no:cacheprovider", "tests/exercises",
           f"--junitxml={junit}", *args]
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def outcomes(junit):
    """exercise id -> list of (test name, outcome, message) from a JUnit XML report."""
    res = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        ex = next(e for e, stem in STEMS.items() if case.get("classname", "").endswith(f"test_{stem}"))
        bad = [c for c in case if c.tag in ("failure", "error", "skipped")]
        res.setdefault(ex, []).append((case.get("name"), bad[0].tag if bad else "passed",
                                       bad[0].get("message", "") if bad else ""))
    return res


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run the grader six ways at once (the runs are independent; starting them together saves time)."""
    tmp = tmp_path_factory.mktemp("grading")
    solved = tmp / "solved"
    solved.mkdir()
    for ex in ("ex2", "ex3"):
        nbformat.write(solved_notebook(ex), str(solved / f"{STEMS[ex]}.ipynb"))
    anonymous = tmp / "my_answer.py"                                       # no exercise id in its name
    anonymous.write_text("")
    cheat = tmp / "cheat"                                                  # "solutions" that call dada_min's own
    cheat.mkdir()
    for ex, fn in (("ex3", "channel_shuffle"), ("ex6", "diffusion_loss")):
        (cheat / f"{STEMS[ex]}.py").write_text(f"import dada_min as dm\n\n\ndef {fn}(*args, **kwargs):\n"
                                               f"    return dm.{fn}(*args, **kwargs)\n")
    jobs = {
        "templates": ["--solution", EX_DIR],                               # every template, as shipped
        "references": ["--solution", os.path.join(EX_DIR, "solutions")],   # every reference solution
        "solved": ["-m", "ex2 or ex3", "--solution", str(solved)],         # notebooks filled in by a "student"
        "one": ["--solution", os.path.join(EX_DIR, f"{STEMS['ex4']}.ipynb")],  # id taken from the file name
        "anonymous": ["--collect-only", "--solution", str(anonymous)],     # which exercise? a usage error
        "cheat": ["-m", "ex3 or ex6", "--solution", str(cheat)],           # calling the answer is refused
    }
    procs = {k: (grade(args, tmp / f"{k}.xml"), tmp / f"{k}.xml") for k, args in jobs.items()}
    out = {}
    for k, (p, junit) in procs.items():
        log = p.communicate(timeout=300)[0]
        out[k] = (p.returncode, log, outcomes(junit) if junit.exists() else {})
    return out


def test_every_template_fails_because_of_its_stub(runs):
    rc, log, res = runs["templates"]
    assert rc == 1, f"grading the templates must fail with test failures (exit 1), got {rc}:\n{log[-3000:]}"
    assert set(res) == set(EXERCISES), f"no test results for {sorted(set(EXERCISES) - set(res))}"
    for ex, cases in res.items():
        for name, outcome, message in cases:
            assert outcome in ("failure", "error"), f"{ex} {name} {outcome} on the template"
            assert f"NotImplementedError: Exercise {ex[2:]}" in message, \
                f"{ex} {name} failed for another reason than the stub: {message}"


def test_every_reference_solution_passes(runs):
    rc, log, res = runs["references"]
    assert rc == 0, f"grading the reference solutions must pass:\n{log[-3000:]}"
    assert set(res) == set(EXERCISES)
    for ex, cases in res.items():
        assert len(cases) >= 3 and all(o == "passed" for _, o, _ in cases), (ex, cases)


def test_filled_in_notebooks_pass_and_only_solution_cells_run(runs):
    rc, log, res = runs["solved"]
    assert rc == 0, log[-3000:]
    assert set(res) == {"ex2", "ex3"} and all(o == "passed" for c in res.values() for _, o, _ in c)


def test_single_notebook_is_graded_by_its_exercise(runs):
    rc, log, res = runs["one"]
    assert rc == 1 and set(res) == {"ex4"}, log[-3000:]
    assert "NotImplementedError: Exercise 4" in log


def test_calling_the_function_the_exercise_asks_for_is_refused(runs):
    rc, log, res = runs["cheat"]
    assert rc == 1 and set(res) == {"ex3", "ex6"}, log[-3000:]
    for ex, cases in res.items():
        for name, outcome, message in cases:
            assert outcome == "failure" and "asks you to write" in message, (ex, name, outcome, message)


def test_one_file_without_an_exercise_id_is_a_usage_error(runs):
    rc, log, _ = runs["anonymous"]
    assert rc == 4 and "-m exN" in log, log[-3000:]


def test_notebooks_are_generated_valid_and_without_outputs(tmp_path):
    gen = load("make_templates", os.path.join(EX_DIR, "_make_templates.py"))
    written = gen.main(str(tmp_path))
    assert sorted(os.path.basename(p) for p in written) == sorted(f"{s}.ipynb" for s in STEMS.values())
    for ex, stem in STEMS.items():
        path = os.path.join(EX_DIR, f"{stem}.ipynb")
        with open(path) as f, open(tmp_path / f"{stem}.ipynb") as g:
            assert json.load(f) == json.load(g), f"{path} is stale: run python notebooks/exercises/_make_templates.py"
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert nb.nbformat == 4
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert nb.cells[0].cell_type == "code" and "import dada_min" in nb.cells[0].source
        assert all(not c.outputs and c.execution_count is None for c in code), f"{path} has outputs"
        sol = [c for c in code if "solution" in c.metadata.get("tags", [])]
        assert len(sol) == 1 and sol[0].source.startswith(f"# SOLUTION {ex}")
        assert f'NotImplementedError("Exercise {ex[2:]}")' in sol[0].source
        assert f"-m {ex} --solution notebooks/exercises/{stem}.ipynb" in "".join(c.source for c in nb.cells)
        assert os.path.isfile(os.path.join(EX_DIR, "solutions", f"{stem}.py"))
        assert os.path.isfile(os.path.join(ROOT, "tests", "exercises", f"test_{stem}.py"))
