"""The program that runs inside the sandbox to test one solution on a list of inputs.

It is shipped as the sandbox's main.py, so it uses only the standard library (the sandbox may run a
different interpreter). It reads case.pkl: {"code", "entry_point", "inputs", "limits", "mode",
"expected", "atol", "oracle"}. Mode "truth" records the outputs (and seconds) of reference code in
out.pkl; mode "check" compares the candidate's outputs with the expected ones, the way evalplus does
(exact equality, else allclose with atol for floats; special oracles for a few tasks), and stops at
the first failure. The verdict is printed as the last stdout line, after a marker.
"""

import contextlib
import copy
import json
import math
import os
import pickle
import signal
import sys
import time

MARKER = "@@qwenkit-verdict@@"


class _Timeout(BaseException):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def _call(fn, args, limit):
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            return fn(*copy.deepcopy(args))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _is_floats(x):
    if isinstance(x, float):
        return True
    return isinstance(x, (list, tuple)) and bool(x) and all(isinstance(i, float) for i in x)


def _allclose(out, exp, atol, rtol=1e-7):
    """numpy.allclose for a number or a flat sequence of numbers."""
    if type(out) is not type(exp):
        return False
    pairs = list(zip(out, exp)) if isinstance(exp, (list, tuple)) else [(out, exp)]
    if isinstance(exp, (list, tuple)) and len(out) != len(exp):
        return False
    return all(abs(a - b) <= atol + rtol * abs(b) for a, b in pairs)


def _poly(xs, x):
    return sum(c * math.pow(x, i) for i, c in enumerate(xs))


def _matches(out, exp, args, atol, oracle):
    if oracle == "find_zero":  # any root is right: check the polynomial, not the number
        return abs(_poly(*args, out)) <= atol
    if oracle == "set":
        out, exp = set(out), set(exp)
    elif oracle == "not_none":
        return out == exp if isinstance(out, bool) else exp == (out is not None)
    if out == exp:
        return True
    atol = atol or (1e-6 if _is_floats(exp) else 0)
    return atol != 0 and _allclose(out, exp, atol)


def main():
    with open("case.pkl", "rb") as f:
        case = pickle.load(f)
    namespace = {"__name__": "__solution__"}
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        exec(compile(case["code"], "solution.py", "exec"), namespace)
    fn = namespace[case["entry_point"]]
    if case["mode"] == "truth":
        return _truth(fn, case)
    passed = 0
    for args, exp, limit in zip(case["inputs"], case["expected"], case["limits"]):
        try:
            ok = _matches(_call(fn, args, limit), exp, args, case["atol"], case.get("oracle"))
        except BaseException:  # a timeout, an exception, or a wrong type in the comparison
            ok = False
        if not ok:
            break
        passed += 1
    print(MARKER + json.dumps({"passed": passed, "total": len(case["inputs"])}))


def _truth(fn, case):
    outputs, seconds = [], []
    for args in case["inputs"]:
        start = time.perf_counter()
        outputs.append(_call(fn, args, case["limits"][0]))
        seconds.append(time.perf_counter() - start)
    with open("out.pkl", "wb") as f:
        pickle.dump({"outputs": outputs, "seconds": seconds}, f)
    print(MARKER + json.dumps({"passed": len(outputs), "total": len(outputs)}))


if __name__ == "__main__":
    sys.setrecursionlimit(10000)
    main()
