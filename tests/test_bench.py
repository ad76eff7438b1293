"""`bioaudio bench`: runs small fake benchmark scripts (one meets its target, one misses it, one
crashes, one prints a lot, a long one that needs data) and checks the results file, the tables,
failures, selection, refusal / merge, Ctrl-C; and that every real script takes the suite flags."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from bioaudio.cli import main

ROOT = Path(__file__).resolve().parents[1]

HEAD = """
import argparse
from pathlib import Path
from bioaudio.benchreport import Report, add_suite_arguments

p = argparse.ArgumentParser()
add_suite_arguments(p)
args = p.parse_args()
"""

SCRIPTS = {
    "bench_good.py": '''"""Meets its target. Second sentence."""'''
    + HEAD
    + """
print("good: measuring", "quick" if args.quick else "full")
plot = args.json.parent / "good_plot.png"
plot.write_bytes(b"png")
r = Report("good", "ours vs theirs", plots=[str(plot)], notes=["a note"])
r.add("speed ratio", 2.5, "x", target=2.0, note="quick" if args.quick else "full")
r.add("absolute", 123.0, "clips/s")
r.write(args.json)
""",
    "bench_miss.py": '''"""Misses its target."""'''
    + HEAD
    + """
r = Report("miss", "a vs b")
r.add("max diff", 0.5, target=1e-4, higher_is_better=False)
r.write(args.json)
""",
    "bench_crash.py": '''"""Crashes."""'''
    + HEAD
    + """
print("about to fail")
raise ValueError("boom in the benchmark")
""",
    "bench_chatty.py": '''"""Prints a lot."""'''
    + HEAD
    + """
import sys
for i in range(3000):
    print(f"line {i} " + "x" * 60)
for i in range(5):
    sys.stdout.write(f"\\rprogress {i}/5")
print()
big = bytearray(80 * 2**20)  # resident memory the suite must see
big[:: 4096] = b"x" * len(big[:: 4096])
r = Report("chatty", "lots of output")
r.add("ratio", 1.0, "x", target=0.5)
r.write(args.json)
""",
    "ssl_probe.py": '''"""Long and needs data."""

BENCH_SUITE = {"long": "an hour", "needs": ["../shared/data"]}
'''
    + HEAD
    + """
raise SystemExit("must not run in these tests")
""",
}


@pytest.fixture
def bench_dir(tmp_path: Path) -> Path:
    # tmp/checkout/benchmarks: ../shared/data of the checkout (tmp/shared/data) does not exist
    folder = tmp_path / "checkout" / "benchmarks"
    folder.mkdir(parents=True)
    for name, text in SCRIPTS.items():
        (folder / name).write_text(textwrap.dedent(text))
    return folder


def bench(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["bench", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def entries(out: Path) -> dict[str, dict]:
    data = json.loads((out / "bench_results.json").read_text())
    return {e["name"]: e for e in data["benchmarks"]}


def test_suite_runs_every_script_and_writes_results(bench_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = bench(capsys, "--quick", "--benchmarks", str(bench_dir), "--out", str(out))
    assert code == 1  # one script failed

    data = json.loads((out / "bench_results.json").read_text())
    m = data["machine"]
    for key in ("cpu_model", "logical_cores", "torch", "cpu_capability", "device", "gpu"):
        assert key in m
    for key in ("host", "platform", "cpu_count", "python", "torchaudio", "git_commit"):
        assert key in m  # from runinfo.hardware() / software()
    assert m["logical_cores"] == os.cpu_count() and m["device"] in ("cpu", "cuda")
    assert data["quick"] is True and data["created"] and "git" in data

    e = entries(out)
    assert list(e) == ["chatty", "crash", "good", "miss", "ssl_probe"]
    good, miss, crash, chatty = e["good"], e["miss"], e["crash"], e["chatty"]
    assert good["status"] == "ok" and miss["status"] == "ok" and chatty["status"] == "ok"
    assert good["figures"][0]["met"] is True and good["figures"][0]["note"] == "quick"
    assert good["figures"][1]["met"] is None
    assert miss["figures"][0]["met"] is False
    assert good["compares"] == "ours vs theirs" and good["notes"] == ["a note"]
    assert good["plots"] == ["plots/good/good_plot.png"]
    assert (out / "plots" / "good" / "good_plot.png").read_bytes() == b"png"
    # the crash is recorded with its last line; the scripts after it still ran
    assert crash["status"] == "failed" and crash["exit_code"] == 1
    assert "ValueError: boom in the benchmark" in crash["error"]
    assert "about to fail" in (out / crash["log"]).read_text()
    assert e["ssl_probe"]["status"] == "skipped" and "long" in e["ssl_probe"]["reason"]
    for run in (good, miss, crash, chatty):
        assert run["peak_rss_mb"] > 0 and run["seconds"] > 0 and run["created"]
        assert run["machine"]["cpu_model"] == m["cpu_model"] and run["quick"] is True
    # each script's own peak: not this (torch-sized) process's, which a fork would inherit
    assert chatty["peak_rss_mb"] > 80 > good["peak_rss_mb"]
    log = (out / "logs" / "chatty.txt").read_text().splitlines()
    assert "line 2999 " + "x" * 60 in log and "progress 4/5" in log

    # console: the scripts' output streamed, then one table with the marks
    assert "good: measuring quick" in stdout and "line 1500 " in stdout
    lines = stdout.splitlines()
    start = max(i for i, ln in enumerate(lines) if ln.startswith("benchmark") and "figure" in ln)
    table = "\n".join(lines[start:])
    rows = {ln.split()[0] + " " + ln.split()[1]: ln for ln in table.splitlines() if ln.strip()}
    assert "yes" in rows["good speed"].split() and "NO" in rows["miss max"].split()
    assert "2.50x" in rows["good speed"] and ">= 2.00x" in rows["good speed"]
    assert "(failed)" in rows["crash (failed)"] and "boom" in rows["crash (failed)"]
    assert "skipped" in rows["ssl_probe (skipped)"]
    assert "MB" in rows["chatty ok"]  # wall time and peak RSS per benchmark

    md = (out / "bench_results.md").read_text()
    assert md.startswith("Machine: ") and "--quick" in md.splitlines()[0]
    assert "| benchmark | figure | value | target | met | note |" in md
    assert "| good | speed ratio | 2.50x | >= 2.00x | yes | quick |" in md
    assert "| miss | max diff | 0.5 | <= 0.0001 | NO |  |" in md
    assert "| crash | (failed) |" in md and "| good | ok |" in md
    assert "- good: ours vs theirs" in md


def test_only_refusal_and_merge(bench_dir, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--benchmarks", str(bench_dir), "--out", str(out)]
    code, _, err = bench(capsys, "--only", "good,nope", *common)
    assert code == 2 and err.count("\n") == 1
    assert "unknown benchmark nope" in err and "valid: chatty, crash, good, miss, ssl_probe" in err
    assert not out.exists()

    assert bench(capsys, "--quick", "--only", "good,crash", *common)[0] == 1
    first = entries(out)
    assert list(first) == ["crash", "good"]

    code, _, err = bench(capsys, "--only", "miss", *common)  # no --overwrite: refused
    assert code == 2 and err.count("\n") == 1 and "--overwrite" in err
    assert entries(out) == first

    # --only + --overwrite refreshes the named entries and keeps the others as they were
    code, stdout, _ = bench(capsys, "--only", "good,miss", "--overwrite", *common)
    assert code == 0
    merged = entries(out)
    assert list(merged) == ["crash", "good", "miss"]
    assert merged["crash"] == first["crash"]
    assert merged["good"]["quick"] is False and first["good"]["quick"] is True
    assert merged["good"]["figures"][0]["note"] == "full"
    assert "kept" in stdout
    data = json.loads((out / "bench_results.json").read_text())
    assert data["quick"] is False
    assert "| crash | (failed) |" in (out / "bench_results.md").read_text()

    # named explicitly, the long one runs, unless what it needs is missing
    code, stdout, _ = bench(capsys, "--only", "ssl_probe", "--overwrite", *common)
    assert code == 0
    probe = entries(out)["ssl_probe"]
    assert probe["status"] == "skipped" and "shared/data" in probe["reason"]
    assert "missing" in probe["reason"] and "ssl_probe: skipped" in stdout

    # without --only, --overwrite starts a new file
    assert bench(capsys, "--quick", "--overwrite", *common)[0] == 1
    assert entries(out)["good"]["quick"] is True


def test_list_and_missing_folder(bench_dir, tmp_path, capsys):
    code, stdout, _ = bench(capsys, "--list", "--benchmarks", str(bench_dir))
    assert code == 0
    lines = dict(ln.split(None, 1) for ln in stdout.strip().splitlines())
    assert lines["good"] == "Meets its target."
    assert lines["ssl_probe"].startswith("Long and needs data.") and "long" in lines["ssl_probe"]
    code, _, err = bench(capsys, "--benchmarks", str(tmp_path / "none"))
    assert code == 2 and err.count("\n") == 1 and "no benchmarks folder" in err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_stops_the_script_and_keeps_what_finished(sig, bench_dir, tmp_path, capsys):
    marker = tmp_path / "started"
    (bench_dir / "bench_zz_sleep.py").write_text(
        '"""Sleeps."""\n' + HEAD + f"import os, time\nPath({str(marker)!r}).write_text("
        "str(os.getpid()))\nprint('sleeping', flush=True)\ntime.sleep(120)\n"
    )
    main_thread = threading.main_thread().ident

    def interrupt() -> None:
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        signal.pthread_kill(main_thread, sig)  # Ctrl-C, or a scheduler stopping the suite

    out = tmp_path / "out"
    threading.Thread(target=interrupt, daemon=True).start()
    code, stdout, _ = bench(
        capsys, "--only", "good,zz_sleep", "--benchmarks", str(bench_dir), "--out", str(out)
    )
    assert code == 130 and "interrupted" in stdout
    with pytest.raises(ProcessLookupError):  # the script was stopped and reaped
        os.kill(int(marker.read_text()), 0)
    assert list(entries(out)) == ["good"]


def test_every_real_script_takes_the_suite_flags():
    # One process runs every script's --help (argparse exits), sharing the heavy imports.
    code = textwrap.dedent(
        """
        import contextlib, io, json, runpy, sys
        from pathlib import Path
        out = {}
        for path in sorted(Path(sys.argv[1]).glob("*.py")):
            buf = io.StringIO()
            sys.argv = [str(path), "--help"]
            try:
                with contextlib.redirect_stdout(buf):
                    runpy.run_path(str(path), run_name="__main__")
            except SystemExit as e:
                out[path.name] = [e.code, buf.getvalue()]
            except Exception as e:  # an import that fails: reported per script
                out[path.name] = [f"{type(e).__name__}: {e}", buf.getvalue()]
            else:
                out[path.name] = ["no exit", buf.getvalue()]
        print(json.dumps(out))
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "benchmarks")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    helps = json.loads(r.stdout.strip().splitlines()[-1])
    assert "bench_fbank.py" in helps and "ssl_probe.py" in helps
    for name, (exit_code, text) in helps.items():
        assert exit_code in (0, None), f"{name} --help exited {exit_code}"
        assert "--quick" in text and "--json" in text, f"{name} lacks --quick / --json"


def test_ssl_probe_figures():
    spec = importlib.util.spec_from_file_location("ssl_probe", ROOT / "benchmarks/ssl_probe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def acc(*scores):
        mean = sum(scores) / len(scores)
        std = (sum((s - mean) ** 2 for s in scores) / (len(scores) - 1)) ** 0.5
        return {"scores": list(scores), "mean": mean, "std": std}

    # ESC-10: a large gain on every fold. Digits: folds of very different difficulty (the
    # fold-std criterion fails) but pretrained better on every one by a steady margin (the
    # paired one holds). A third task-like case: gains of both signs (neither holds).
    esc_r, esc_p = acc(0.40, 0.42, 0.38, 0.41, 0.39), acc(0.55, 0.58, 0.52, 0.57, 0.53)
    dig_r, dig_p = acc(0.10, 0.30, 0.50, 0.20, 0.40), acc(0.15, 0.36, 0.54, 0.26, 0.45)
    v_esc, v_dig = mod.verdict(esc_p, esc_r), mod.verdict(dig_p, dig_r)
    assert v_esc["learns"] and v_esc["learns_paired"] and v_esc["folds_won"] == "5/5"
    assert not v_dig["learns"] and v_dig["learns_paired"]
    assert v_dig["gain"] == pytest.approx(0.052) and v_dig["paired_sem"] > 0
    mixed = mod.verdict(acc(0.5, 0.3, 0.6, 0.2), acc(0.4, 0.4, 0.5, 0.3))
    assert not mixed["learns_paired"] and mixed["folds_won"] == "2/4"
    with pytest.raises(ValueError):  # probes on different folds cannot be paired
        mod.verdict(acc(0.5, 0.6), acc(0.4, 0.5, 0.6))

    results = {
        "models": {
            "eat": {
                "pretrain": {"total_steps": 120, "total_minutes": 2.0},
                "random": {"esc10": esc_r, "digits": dig_r},
                "pretrained": {"esc10": esc_p, "digits": dig_p},
                "verdict": {"esc10": v_esc, "digits": v_dig},
            }
        }
    }
    d = mod.figures(results, "small").as_dict()
    assert d["benchmark"] == "ssl_probe"
    f = {x["figure"]: x for x in d["figures"]}
    gain = f["eat small, ESC-10 (5 folds): gain over random"]
    assert gain["value"] == pytest.approx(15.0) and gain["target"] == pytest.approx(
        100 * v_esc["two_std"]
    )
    assert gain["met"] is True and gain["unit"] == "pp" and "120 steps" in gain["note"]
    assert f["eat small, spoken digits (by speaker): gain over random"]["met"] is False
    paired = f["eat small, spoken digits (by speaker): paired gain / its standard error"]
    assert paired["met"] is True and "5/5" in paired["note"]
    assert f["eat small, ESC-10 (5 folds): probe accuracy, pretrained"]["value"] == pytest.approx(
        55
    )
    assert f["eat small, spoken digits (by speaker): probe accuracy, random weights"]["value"] == (
        pytest.approx(30.0)
    )
    assert len(d["figures"]) == 8


def test_ssl_probe_learning_rate_per_objective():
    spec = importlib.util.spec_from_file_location("ssl_probe", ROOT / "benchmarks/ssl_probe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rates = {
        name: mod.stage_lr(flags, None) for st in mod.RECIPES.values() for name, _, flags, _ in st
    }
    # BEATs masked-token stages train at the post-LN rate, EAT and tokenizer training at 1e-3
    assert rates["pretrain_beats"] == rates["pretrain_beats_iter2"] == 2e-4
    assert rates["pretrain_beats_eat_teacher"] == 2e-4
    assert rates["pretrain_eat"] == rates["tokenizer_beats"] == rates["tokenizer_from_eat"] == 1e-3
    assert mod.stage_lr(["--objective", "beats:1"], 5e-4) == 5e-4  # --lr overrides every stage


def test_ssl_probe_refuses_variants_missing_their_teacher(tmp_path):
    spec = importlib.util.spec_from_file_location("ssl_probe", ROOT / "benchmarks/ssl_probe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.check_variants(["eat", "beats_eat_teacher", "beats", "beats_iter2"], tmp_path)  # fine
    with pytest.raises(SystemExit, match="list eat before it"):
        mod.check_variants(["beats_eat_teacher"], tmp_path)
    with pytest.raises(SystemExit, match="unknown variant 'bogus'"):
        mod.check_variants(["eat", "bogus"], tmp_path)
    (tmp_path / "pretrain_beats" / "export").mkdir(parents=True)  # an earlier run of the folder
    mod.check_variants(["beats_iter2"], tmp_path)


def test_flop_counter_counts_a_grouped_conv_backward_once():
    """torch's formula counts a grouped convolution's backward once per group; ours counts each
    requested gradient as one forward, and agrees with torch's when there are no groups."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from bioaudio.benchreport import flop_counter

    def count(mode, groups, transposed=False):
        x = torch.randn(2, 16, 40, requires_grad=True)
        w = torch.randn(16, 16 // groups, 5, requires_grad=True)
        conv = F.conv_transpose1d if transposed else F.conv1d
        with mode as c:
            conv(x, w, padding=2, groups=groups).sum().backward()
        return c.get_total_flops()

    forward = 2 * 2 * 16 * 40 * 4 * 5  # batch x C_out x outputs x C_in / groups x kernel
    assert count(flop_counter(), 4) == 3 * forward
    assert count(flop_counter(), 1) == count(FlopCounterMode(display=False), 1)
    assert count(flop_counter(), 1, True) == count(FlopCounterMode(display=False), 1, True)


def test_pos_conv_impls_agree():
    import torch

    from beats.model import pos_conv_impl
    from bioaudio.models.registry import build_encoder

    enc = build_encoder("beats", "tiny").encoder
    x = torch.randn(2, 37, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fft = enc.pos_conv_embed(x)
        with pos_conv_impl("direct"):
            direct = enc.pos_conv_embed(x)
    torch.testing.assert_close(fft, direct, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown"):
        with pos_conv_impl("winograd"):  # type: ignore[arg-type]
            pass
