"""Odd inputs for every command family: each ends in its exit code, one line on stderr, no
traceback, and nothing written (>= 30 inputs per family: lengths, encodings, NUL bytes,
out-of-range numbers, folders that are files, unwritable outputs, FIFOs, unknown options)."""
import os

import pytest

from shapefirst.cli import main

NUMBERS = ["abc", "", "nan", "inf", "-inf", "-1", "1e999", "99999999999999999999999", "0x10"]
FAMILIES = ("generate", "analyze", "report", "sweep", "calibrate", "train")


@pytest.fixture(scope="module")
def odd(tmp_path_factory, tiny_folder):
    root = tmp_path_factory.mktemp("odd")
    p = {"model": str(tiny_folder), "root": root}
    (root / "file.txt").write_text("a file")
    os.mkfifo(root / "fifo")
    (root / "nul.txt").write_bytes(b"a red\x00circle\n")
    (root / "utf16.txt").write_bytes("a red circle\n".encode("utf-16"))
    (root / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (root / "empty.txt").write_text("\n# only a comment\n")
    (root / "dir").mkdir()
    (root / "emptydir").mkdir()
    return p


def _int_opts(family):
    return {"generate": ["--steps", "--seed", "--images-per-prompt", "--batch", "--guidance-stop-step",
                         "--adaptive-min-call"],
            "analyze": ["--n", "--steps", "--seed", "--batch"],
            "report": [],
            "sweep": ["--n", "--seed", "--batch", "--timing-batches"],
            "calibrate": ["--n", "--steps", "--batch", "--timing-batches"],
            "train": ["--seed", "--unet-steps"]}[family]


def _float_opts(family):
    return {"generate": ["--guidance", "--guidance-stop", "--adaptive", "--guidance-start", "--adaptive-shape"],
            "analyze": ["--guidance"], "report": ["--guidance"], "sweep": ["--guidance"],
            "calibrate": ["--guidance", "--tolerance"], "train": ["--unet-lr"]}[family]


def _base(family, p):
    return {"generate": ["generate", "x", "--model", p["model"], "--steps", "2"],
            "analyze": ["analyze", "frequency", "--model", p["model"], "--steps", "2",
                        "--prompts", str(p["root"] / "file.txt")],
            "report": ["report", "--model", p["model"], "--prompts", str(p["root"] / "file.txt")],
            "sweep": ["sweep", "--model", p["model"], "--prompts", str(p["root"] / "file.txt"), "--steps", "2"],
            "calibrate": ["calibrate", "--model", p["model"],
                          "--prompts", str(p["root"] / "file.txt"), "--steps", "2"],
            "train": ["train", "--tiny"]}[family]


def cases(family):
    """(id, argv builder) pairs: every one must fail with exit 2 before any work."""
    out = []
    for opt in _int_opts(family):
        for v in ("abc", "", "1.5", "-1", "99999999999999999999999", "0x10"):
            out.append((f"{opt}={v!r}", lambda p, o=opt, v=v: [o, v]))
    for opt in _float_opts(family):
        for v in ("abc", "", "nan", "inf", "-inf", "-1", "1e999"):
            out.append((f"{opt}={v!r}", lambda p, o=opt, v=v: [o, v]))
    paths = [("out-is-file", lambda p: ["--out", str(p["root"] / "file.txt")]),
             ("out-is-fifo", lambda p: ["--out", str(p["root"] / "fifo")]),
             ("out-under-file", lambda p: ["--out", str(p["root"] / "file.txt" / "sub")]),
             ("out-unwritable", lambda p: ["--out", "/proc/self/shapefirst-out"]),
             ("unknown-option", lambda p: ["--no-such-option", "1"]),
             ("out-nul", lambda p: ["--out", "a\x00b"]),
             ("out-missing-value", lambda p: ["--out"]),
             ("device-gpu", lambda p: ["--device", "gpu"]),
             ("device-mps", lambda p: ["--device", "mps"]),
             ("device-cuda7", lambda p: ["--device", "cuda:7"])]
    if family == "train":
        paths = [x for x in paths if not x[0].startswith("device")] + [
            ("dest-is-file", lambda p: ["--dest", str(p["root"] / "file.txt")]),
            ("dest-is-fifo", lambda p: ["--dest", str(p["root"] / "fifo")]),
            ("dest-user-folder", lambda p: ["--dest", str(p["root"] / "dir_with_file")]),
            ("dest-is-cwd-parent", lambda p: ["--dest", str(p["root"])]),
            ("out-user-folder", lambda p: ["--out", str(p["root"] / "dir_with_file")]),
            ("out-nonempty", lambda p: ["--out", str(p["root"])]),
            ("dest-nul", lambda p: ["--dest", "a\x00b"]),
            ("dest-missing-value", lambda p: ["--dest"]),
            ("dest-under-file", lambda p: ["--dest", str(p["root"] / "file.txt" / "m")]),
            ("dest-unwritable", lambda p: ["--dest", "/proc/self/shapefirst-model"]),
            ("dest-equals-out", lambda p: ["--dest", "out"]),
            ("dest-cwd", lambda p: ["--dest", "."]),
            ("extra-argument", lambda p: ["extra"]),
            ("unknown-flag", lambda p: ["--tiny2"]),
            ("seed-2^63", lambda p: ["--seed", str(2**63)]),
            ("seed-nan", lambda p: ["--seed", "nan"]),
            ("seed-inf", lambda p: ["--seed", "inf"])]
    out += paths
    if family != "train":
        out += [("model-missing", lambda p: ["--model", str(p["root"] / "missing")]),
                ("model-is-file", lambda p: ["--model", str(p["root"] / "file.txt")]),
                ("model-is-fifo", lambda p: ["--model", str(p["root"] / "fifo")]),
                ("model-empty-dir", lambda p: ["--model", str(p["root"] / "emptydir")])]
    if family in ("analyze", "report", "sweep", "calibrate"):
        for name in ("fifo", "nul.txt", "utf16.txt", "latin1.txt", "empty.txt", "dir", "missing"):
            out.append((f"prompts-{name}", lambda p, n=name: ["--prompts", str(p["root"] / n)]))
    if family == "generate":
        out += [("prompt-nul", lambda p: ["a\x00b"]),
                ("stop-and-step", lambda p: ["--guidance-stop", "0.5", "--guidance-stop-step", "1"]),
                ("steps-1001", lambda p: ["--steps", "1001"]),
                ("seed-2^64", lambda p: ["--seed", str(2**64)]),
                ("cache-unknown", lambda p: ["--cache", "fast"]),
                ("images-0", lambda p: ["--images-per-prompt", "0"]),
                ("batch-1000", lambda p: ["--batch", "1000"])]
    if family in ("sweep", "calibrate"):
        out += [("stops-letters", lambda p: ["--stops", "a,b"]), ("stops-2", lambda p: ["--stops", "2"]),
                ("steps-1001", lambda p: ["--steps", "1001"]), ("steps-0", lambda p: ["--steps", "0"]),
                ("adaptive-1.5", lambda p: ["--adaptive", "1.5"]), ("caches-bad", lambda p: ["--caches", "deep"]),
                ("n-0", lambda p: ["--n", "0"]), ("batch-0", lambda p: ["--batch", "0"])]
    if family == "sweep":
        out += [("schedulers-empty", lambda p: ["--schedulers", ""]),
                ("schedulers-bad", lambda p: ["--schedulers", "heun9"]),
                ("real-no-inception", lambda p: ["--real", str(p["root"] / "dir")])]
    if family == "calibrate":
        out += [("modes-bad", lambda p: ["--modes", "both"]), ("tolerance-0", lambda p: ["--tolerance", "0"])]
    if family == "analyze":
        out += [("name-unknown", lambda p: "REPLACE-NAME"), ("n-0", lambda p: ["--n", "0"]),
                ("steps-1001", lambda p: ["--steps", "1001"]), ("batch-0", lambda p: ["--batch", "0"]),
                ("pairs-fifo", lambda p: ["--pairs", str(p["root"] / "fifo")])]
    if family == "report":
        out += [("budget-huge", lambda p: ["--budget", "huge"]), ("budget-empty", lambda p: ["--budget", ""]),
                ("clip-missing", lambda p: ["--clip", str(p["root"] / "dir")]),
                ("pairs-fifo", lambda p: ["--pairs", str(p["root"] / "fifo")]),
                ("pairs-nul", lambda p: ["--pairs", str(p["root"] / "nul.txt")])]
    return out


PARAMS = [pytest.param(f, build, id=f"{f}-{cid}") for f in FAMILIES for cid, build in cases(f)]


def test_at_least_30_odd_inputs_per_family():
    for f in FAMILIES:
        assert len(cases(f)) >= 30, (f, len(cases(f)))


@pytest.mark.parametrize("family,build", PARAMS)
def test_odd_input(family, build, odd, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (odd["root"] / "dir_with_file").mkdir(exist_ok=True)
    (odd["root"] / "dir_with_file" / "mine.txt").write_text("a user's file")
    out = tmp_path / "out"
    extra = build(odd)
    argv = _base(family, odd)
    if extra == "REPLACE-NAME":
        argv = ["analyze", "no-such-analysis"] + argv[2:]
    else:
        argv = argv + extra
    if "--out" not in argv:
        argv += ["--out", str(out)]
    before = sorted(p.name for p in odd["root"].iterdir())
    code = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert not out.exists() or not any(out.rglob("*")), list(out.rglob("*"))
    assert sorted(p.name for p in odd["root"].iterdir()) == before
    assert (odd["root"] / "dir_with_file" / "mine.txt").read_text() == "a user's file"
    assert not list(odd["root"].glob(".*.tmp"))
