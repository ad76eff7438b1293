"""Embedding export and explorer maps, measured side by side in one run (ratios, not absolutes).

1. Embedding throughput: `bioaudio embed` end to end (folder scan, windows read by seeking,
   padded batches, Parquet parts and merge) vs the bare encoder forward (`model.embed`) on the
   same clips already decoded in memory, same batch size. Target: >= 80 % of the bare forward.
2. Time to the first map for N random clustered embeddings of dim 768 (default N = 5,000 and
   20,000): PCA, UMAP, t-SNE on openTSNE and on scikit-learn, as the app computes them.
3. A re-colour (building the map figure with another colour column and serialising it, what
   a Streamlit rerun does; the projection comes from the cache) as a fraction of each map's time.

Figures (`--json`, `bioaudio bench`): embed / bare forward throughput for each worker setting
(target >= 80 %; end to end, model load included); per map size the time to the first map of
each method, and openTSNE's speed-up over scikit-learn's t-SNE (no targets).

Usage: python benchmarks/bench_explorer.py [--encoder base] [--clips 48] [--sizes 5000,20000]
       [--sklearn_max 20000] (larger maps skip scikit-learn's t-SNE)
       [--quick] (32 clips, one repeat, one 2,000-point map) [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from bioaudio.explorer.projections import ensure_numba_cache

ensure_numba_cache()

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402

from bioaudio.benchreport import Report, add_suite_arguments  # noqa: E402
from bioaudio.data import audio  # noqa: E402
from bioaudio.explorer import figures, projections  # noqa: E402
from bioaudio.inference.embed import (  # noqa: E402
    EmbedConfig,
    embed_to_parquet,
    input_table,
    iter_file_embeddings,
    load_embedder,
    to_arrow,
    window_table,
)
from bioaudio.models.audio_model import build_model  # noqa: E402
from bioaudio.models.checkpoint import save_export  # noqa: E402


def bench_embedding(
    report: Report,
    encoder: str,
    clips: int,
    seconds: float,
    batch: int,
    workers: int,
    repeats: int,
) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bioaudio-bench-embed-"))
    rng = np.random.default_rng(0)
    data = tmp / "clips"
    data.mkdir()
    for i in range(clips):  # 22.05 kHz files: the export resamples, as field recordings need
        t = np.arange(int(seconds * 22050)) / 22050
        x = 0.3 * np.sin(2 * np.pi * (300 + 40 * i) * t) + 0.05 * rng.standard_normal(t.size)
        sf.write(data / f"SITE_20240501_{i:06d}.wav", x.astype(np.float32), 22050)
    torch.manual_seed(0)
    model_dir = save_export(build_model("eat", encoder=encoder), tmp / "model")
    t0 = time.perf_counter()
    embedder = load_embedder(model_dir, device="cpu")
    t_load = time.perf_counter() - t0  # paid once per command, whatever the amount of audio
    wavs = [
        torch.from_numpy(audio.load(p, 16000, 0.0, seconds)) for p in sorted(data.glob("*.wav"))
    ]
    print(f"\n1. embedding {clips} clips of {seconds:g} s, EAT {encoder}, batch {batch}")
    with torch.inference_mode():
        embedder(torch.stack(wavs[:batch]))  # warm-up (allocator, kernels)

    def bare_pass() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, clips, batch):
                embedder(torch.stack(wavs[i : i + batch]))
        return time.perf_counter() - t0

    def our_pass(w: int, r: int) -> float:
        out = tmp / f"emb_{w}_{r}.parquet"
        cfg = EmbedConfig(window=seconds, batch_size=batch, num_workers=w, progress=False, cpu=True)
        t0 = time.perf_counter()
        res = embed_to_parquet(model_dir, data, out, cfg)
        assert res.rows == clips
        return time.perf_counter() - t0

    # interleaved repeats, best of each: other load on the machine hits every variant alike
    times: dict[str, list[float]] = {}
    for r in range(repeats):
        times.setdefault("bare", []).append(bare_pass())
        for w in sorted({0, workers}):
            times.setdefault(f"bioaudio embed (num_workers={w})", []).append(our_pass(w, r))

    # the same pipeline with the forward replaced by zeros: its own cost, measured directly
    # (a difference of two noisy totals on a shared machine would hide it)
    class NoForward:
        dim, sample_rate, device = embedder.dim, embedder.sample_rate, embedder.device

        def __call__(self, wav: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
            return torch.zeros(len(wav), self.dim)

    t0 = time.perf_counter()
    table, _ = input_table(data)
    windows = window_table(table, seconds)
    files = list(iter_file_embeddings(NoForward(), windows, batch))
    rows = pd.concat([f.rows for f in files], ignore_index=True)
    pq.write_table(to_arrow(rows, np.concatenate([f.embeddings for f in files])), tmp / "x.pq")
    t_pipe = time.perf_counter() - t0
    bare = min(times.pop("bare"))
    print(
        f"   {'bare model.embed on decoded clips':38s} {bare:7.2f} s  {clips / bare:7.2f} clips/s"
    )
    print(
        f"   pipeline without the forward (scan, seek + decode + resample, batches, Parquet):"
        f" {t_pipe:.2f} s = {t_pipe / bare:.1%} of the bare forward -> at most"
        f" {bare / (bare + t_pipe):.1%} of bare when run serially"
    )
    for name, ts in times.items():
        t = min(ts)
        print(f"   {name:38s} {t:7.2f} s  {clips / t:7.2f} clips/s  = {bare / t:5.1%} of bare")
        steady = t - t_load
        print(
            f"     less the one-time model load ({t_load:.2f} s): {clips / steady:7.2f} clips/s"
            f"  = {bare / steady:5.1%} of bare"
        )
        report.add(
            f"{name} / bare forward throughput",
            100 * bare / t,
            "%",
            target=80.0,
            note=f"EAT {encoder}, {clips} clips of {seconds:g} s, batch {batch}, best of "
            f"{repeats}; {100 * bare / steady:.0f} % less the {t_load:.1f} s model load",
        )


def clustered(n: int, dim: int = 768, k: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)) * 2.0
    labels = rng.integers(0, k, n)
    X = centres[labels] + rng.normal(size=(n, dim))
    return X.astype(np.float32), labels


def timed(fn, *a, **kw) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    return time.perf_counter() - t0, out


def bench_maps(report: Report, sizes: list[int], sklearn_max: int) -> None:
    print(f"\n2./3. first map and re-colour, dim 768, {projections.threads()} thread(s) per fit")
    # what the app's background warm-up does once per server process (numba JIT)
    t_compile, _ = timed(projections.warm_up_umap)
    print(
        f"   UMAP warm-up (numba cache load + uncacheable JIT, once per process): {t_compile:.1f} s"
    )
    for n in sizes:
        X, labels = clustered(n)
        rows = pd.DataFrame(
            {
                "file": [f"f{i}.wav" for i in range(n)],
                "window": "0-5 s",
                "labels": [f"class_{c}" for c in labels],
                "cluster": labels % 5,
                "month": 1 + labels % 12,
            }
        )
        results = []
        for name, kw in [
            ("PCA", {"method": "pca"}),
            ("UMAP", {"method": "umap"}),
            ("t-SNE openTSNE", {"method": "tsne", "backend": "opentsne"}),
            ("t-SNE scikit-learn", {"method": "tsne", "backend": "sklearn"}),
        ]:
            if kw.get("backend") == "sklearn" and n > sklearn_max:
                results.append((name, None, None, None))
                continue
            t_map, proj = timed(projections.fit_projection, X, **kw)
            t_fig, fig = timed(figures.map_figure, proj.coords, rows, "labels", title=name)
            t_json, _ = timed(fig.to_json)  # what Streamlit sends on a rerun
            t_fig2, fig2 = timed(figures.map_figure, proj.coords, rows, "month", title=name)
            t_recolour = t_fig2 + timed(fig2.to_json)[0]
            results.append((name, t_map + t_fig + t_json, t_recolour, t_recolour / t_map))
        print(f"   N = {n}")
        base = {name: t for name, t, _, _ in results}
        for name, t, t_re, ratio in results:
            if t is None:
                print(f"     {name:20s}  skipped (N > --sklearn_max {sklearn_max})")
                continue
            vs = base.get("t-SNE scikit-learn")
            extra = (
                f"  ({vs / t:4.1f}x faster than scikit-learn)" if "openTSNE" in name and vs else ""
            )
            print(
                f"     {name:20s} first map {t:7.2f} s   re-colour {t_re:5.2f} s ="
                f" {ratio:6.2%} of the map{extra}"
            )
            report.add(
                f"first map, {name}, N={n}",
                t,
                "s",
                higher_is_better=False,
                note=f"dim 768; re-colour {t_re:.2f} s = {ratio:.1%} of the map",
            )
            if "openTSNE" in name and vs:
                report.add(f"t-SNE openTSNE / scikit-learn speed, N={n}", vs / t, "x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", default="base", help="EAT preset for the throughput part")
    ap.add_argument("--clips", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repeats (best kept)")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=0, help="also time this many DataLoader workers")
    ap.add_argument("--sizes", default="5000,20000")
    ap.add_argument("--sklearn_max", type=int, default=20000)
    ap.add_argument("--skip_embedding", action="store_true")
    add_suite_arguments(ap)
    args = ap.parse_args()
    if args.quick:
        # two batches (one alone would time a cold first batch), one repeat, one small map
        args.clips, args.repeats, args.sizes = min(args.clips, 32), 1, "2000"
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"machine: {os.cpu_count()} CPU(s), torch {torch.__version__}")
    report = Report(
        "explorer",
        "`bioaudio embed` end to end vs the bare encoder forward on the same decoded clips; "
        "time to the first explorer map (PCA, UMAP, t-SNE) and to a re-colour",
    )
    if not args.skip_embedding:
        bench_embedding(
            report,
            args.encoder,
            args.clips,
            args.seconds,
            args.batch_size,
            args.workers,
            args.repeats,
        )
    bench_maps(report, [int(s) for s in args.sizes.split(",")], args.sklearn_max)
    report.write(args.json)


if __name__ == "__main__":
    main()
