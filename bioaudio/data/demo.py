"""A small synthetic bioacoustic dataset, generated deterministically from a seed.

Six made-up "species" with distinct call shapes (FM sweeps, pulse trains, harmonic stacks,
trills, broadband click trains, an amplitude-modulated frog chorus), each varying within the
class (frequency range, duration, repetition rate), placed at random times over pink / brown
noise, wind rumble and distractor sounds at SNRs spread over -5..20 dB, at mixed sample rates,
lengths, channel counts and formats (WAV, FLAC, OGG). One call to `generate_demo_data` writes
every layout of data/README.md, so each reader of `bioaudio prepare` has real input:

    unlabelled/site_X/YYYY-MM-DD/*.wav     nested tree, no labels
    labelled/labels.csv + labelled/audio/  clip labels, some clips with two species (multi-label)
    by_class/<species>/*.wav               one folder per class
    soundscapes/*.wav                      long recordings, Raven tables (+ one Audacity track)
    pairs/positive/, pairs/negative/       the target species present / absent

The same seed and options give the same bytes (OGG stream serial numbers, random in libsndfile,
are rewritten), so tests can hash the tree.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from bioaudio.errors import ConfigError

FORMAT_TAG = "bioaudio-demo-data"
FORMAT_VERSION = 1
MARKER = ".bioaudio-demo-data.json"
LAYOUTS = ("unlabelled", "labelled", "by_class", "soundscapes", "pairs")
OWNED = (*LAYOUTS, "README.txt", MARKER)  # where a generation writes (the marker lists its files)

SPECIES: dict[str, str] = {
    "sweep_tanager": "2-5 fast downward FM sweeps (~6.5 -> 2.5 kHz), sometimes a final upsweep",
    "pulse_cricket": "pulse train: a 3.5-5.2 kHz tone gated at 25-45 pulses/s",
    "hoot_owl": "1-3 low hoots: harmonic stack on a 300-600 Hz fundamental, slight glide",
    "trill_wren": "trill: a 2.5-4 kHz tone frequency-modulated 12-22 times/s",
    "click_beetle": "trains of broadband clicks, 8-25 ms apart",
    "chorus_frog": "chorus of 2-3 voices at 0.8-1.4 kHz, amplitude-modulated at 6-12 Hz",
}
PAIR_TARGET = "trill_wren"
SAMPLE_RATES = (16000, 22050, 32000, 44100, 48000)
RATE_WEIGHTS = (0.4, 0.3, 0.1, 0.1, 0.1)  # low rates dominate to keep the tree small
SNR_DB = (-5.0, 20.0)


@dataclass
class DemoDataConfig:
    """Options of `bioaudio demo-data`."""

    seed: int = field(default=0, metadata={"help": "random seed (same seed = same bytes)"})
    n_per_class: int = field(
        default=16,
        metadata={"help": "clips per species in by_class/; labelled/ and pairs/ scale with it"},
    )
    n_unlabelled: int = field(default=32, metadata={"help": "clips in unlabelled/"})
    soundscapes: int = field(
        default=3, metadata={"help": "long soundscape recordings (60-90 s) with Raven tables"}
    )
    force: bool = field(
        default=False,
        metadata={"help": "write into a non-empty OUT that is not a previous demo-data output"},
    )

    def validate(self) -> None:
        if self.n_per_class < 1:
            raise ConfigError(f"--n_per_class must be >= 1, got {self.n_per_class}")
        if self.n_unlabelled < 0:
            raise ConfigError(f"--n_unlabelled must be >= 0, got {self.n_unlabelled}")
        if self.soundscapes < 0:
            raise ConfigError(f"--soundscapes must be >= 0, got {self.soundscapes}")


# ---------------------------------------------------------------------------------------------
# call synthesis: each returns one bout (float64, peak ~1) and its frequency box


@dataclass
class Call:
    wave: np.ndarray
    low_freq: float
    high_freq: float


def _phase_tone(freq: np.ndarray, sr: int, phase0: float = 0.0) -> np.ndarray:
    """A tone following the instantaneous frequency `freq` (Hz per sample)."""
    return np.sin(phase0 + 2 * np.pi * np.cumsum(freq) / sr)


def _tukey(n: int, ramp: float = 0.2) -> np.ndarray:
    """Flat window with raised-cosine ramps over `ramp` of each end (no clicks at the edges)."""
    w = np.ones(n)
    k = max(1, int(n * ramp))
    r = 0.5 - 0.5 * np.cos(np.pi * np.arange(k) / k)
    w[:k] = r
    w[n - k :] = r[::-1]
    return w


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(1)


def _sweep_tanager(rng: np.random.Generator, sr: int) -> Call:
    notes, lo, hi = [], np.inf, 0.0
    for i in range(int(rng.integers(2, 6))):
        dur = rng.uniform(0.06, 0.15)
        f_hi, f_lo = rng.uniform(5000, 7000), rng.uniform(2000, 3500)
        t = np.arange(int(dur * sr)) / sr
        f = f_hi * (f_lo / f_hi) ** (t / dur)  # exponential downsweep
        if i > 0 and rng.random() < 0.2:
            f = f[::-1]
        # a faint 2nd harmonic, silenced where it would pass 0.45 * sr (no aliasing at 16 kHz)
        x = _phase_tone(f, sr) + 0.15 * (2 * f < 0.45 * sr) * _phase_tone(2 * f, sr)
        notes += [x * _tukey(len(x), 0.3), np.zeros(int(rng.uniform(0.05, 0.15) * sr))]
        lo, hi = min(lo, f_lo), max(hi, f_hi)
    return Call(_concat(notes[:-1]), lo, hi)


def _pulse_cricket(rng: np.random.Generator, sr: int) -> Call:
    fc, rate, duty = rng.uniform(3500, 5200), rng.uniform(25, 45), rng.uniform(0.3, 0.5)
    n = int(rng.uniform(0.5, 1.4) * sr)
    t = np.arange(n) / sr
    drift = 1 + 0.05 * np.sin(2 * np.pi * rng.uniform(0.3, 1.0) * t)  # rate jitter
    ph = np.cumsum(rate * drift / sr) % 1.0
    gate = np.where(ph < duty, np.sin(np.pi * ph / duty) ** 2, 0.0)
    x = _phase_tone(np.full(n, fc), sr) * gate * _tukey(n, 0.1)
    return Call(x, fc - 400, fc + 400)


def _hoot_owl(rng: np.random.Generator, sr: int) -> Call:
    notes, f0 = [], rng.uniform(300, 600)
    kmax = 6
    for _ in range(int(rng.integers(1, 4))):
        dur = rng.uniform(0.25, 0.6)
        t = np.arange(int(dur * sr)) / sr
        f = f0 * (1 - 0.12 * t / dur) * (1 + 0.02 * np.sin(2 * np.pi * 5 * t))
        x = sum(_phase_tone(k * f, sr) / k for k in range(1, kmax + 1) if k * f0 < 0.45 * sr)
        notes += [x * np.hanning(len(x)) ** 0.5, np.zeros(int(rng.uniform(0.15, 0.4) * sr))]
    return Call(_concat(notes[:-1]), 0.85 * f0, min(kmax * f0, 0.45 * sr))


def _trill_wren(rng: np.random.Generator, sr: int) -> Call:
    fc, rate, depth = rng.uniform(2500, 4000), rng.uniform(12, 22), rng.uniform(400, 1200)
    n = int(rng.uniform(0.6, 1.4) * sr)
    t = np.arange(n) / sr
    mod = np.sin(2 * np.pi * rate * t)
    x = _phase_tone(fc + depth * mod, sr) * (0.6 + 0.4 * mod) * _tukey(n, 0.1)
    return Call(x, fc - depth, fc + depth)


def _click_beetle(rng: np.random.Generator, sr: int) -> Call:
    kernel_n = max(4, int(0.0015 * sr))
    trains = []
    for _ in range(int(rng.integers(1, 4))):
        n = int(rng.uniform(0.2, 0.7) * sr)
        ici = rng.uniform(0.008, 0.025)
        times = np.cumsum(ici * (1 + 0.1 * rng.standard_normal(int(n / sr / ici) + 2)))
        idx = (times[times < n / sr - 0.002] * sr).astype(int)
        imp = np.zeros(n)
        imp[idx] = rng.uniform(0.5, 1.0, len(idx))
        # each click: a 1.5 ms burst of decaying noise, differenced so it is broadband, not low
        kern = np.diff(rng.standard_normal(kernel_n + 1) * np.exp(-np.arange(kernel_n + 1) / 6))
        trains += [np.convolve(imp, kern)[:n], np.zeros(int(rng.uniform(0.1, 0.3) * sr))]
    return Call(_concat(trains[:-1]), 1000.0, 0.45 * sr)


def _chorus_frog(rng: np.random.Generator, sr: int) -> Call:
    n = int(rng.uniform(1.0, 2.5) * sr)
    t = np.arange(n) / sr
    x = np.zeros(n)
    carriers = rng.uniform(800, 1400, int(rng.integers(2, 4)))
    for fc in carriers:
        am = 0.5 * (1 + np.sin(2 * np.pi * rng.uniform(6, 12) * t + rng.uniform(0, 2 * np.pi)))
        tone = sum(
            a * _phase_tone(np.full(n, k * fc), sr) for k, a in ((1, 1), (2, 0.5), (3, 0.25))
        )
        x += am**2 * tone * rng.uniform(0.6, 1.0)
    return Call(x * _tukey(n, 0.15), 0.9 * carriers.min(), 3.1 * carriers.max())


CALLS: dict[str, Callable[[np.random.Generator, int], Call]] = {
    "sweep_tanager": _sweep_tanager,
    "pulse_cricket": _pulse_cricket,
    "hoot_owl": _hoot_owl,
    "trill_wren": _trill_wren,
    "click_beetle": _click_beetle,
    "chorus_frog": _chorus_frog,
}


def synth_call(species: str, rng: np.random.Generator, sr: int) -> Call:
    """One bout of `species` at `sr`, peak-normalised to 1."""
    c = CALLS[species](rng, sr)
    peak = float(np.abs(c.wave).max()) or 1.0
    return Call(c.wave / peak, float(c.low_freq), float(c.high_freq))


# ---------------------------------------------------------------------------------------------
# backgrounds and scenes


def _fast_len(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n: an FFT length that is fast without padding to 2^k."""
    best = 1 << max(0, math.ceil(math.log2(max(n, 1))))
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35 << max(0, math.ceil(math.log2(n / p35)))
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def _shaped_noise(
    rng: np.random.Generator, n: int, sr: int, shape: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """Gaussian noise with amplitude spectrum `shape(f)`, unit RMS.

    White noise has i.i.d. complex Gaussian Fourier coefficients, so we draw those directly and
    need only one inverse FFT per noise.
    """
    m = _fast_len(max(n, 16))
    f = np.fft.rfftfreq(m, 1 / sr)
    f[0] = f[1]
    spec = rng.standard_normal(len(f)) + 1j * rng.standard_normal(len(f))
    x = np.fft.irfft(spec * shape(f), m)[:n]
    return x / (x.std() + 1e-12)


def _colored(
    rng: np.random.Generator, n: int, exponent: float, sr: int, cutoff: float = 0.0
) -> np.ndarray:
    """Noise with power ~ 1/f**exponent (pink 1, brown 2), optional low-pass; unit RMS."""

    def shape(f: np.ndarray) -> np.ndarray:
        a = f ** (-exponent / 2)
        return a / (1 + (f / cutoff) ** 4) if cutoff else a

    return _shaped_noise(rng, n, sr, shape)


def background(rng: np.random.Generator, sr: int, n: int) -> np.ndarray:
    """Unit-RMS mixture of pink and brown noise and gusty wind rumble."""
    w_pink, w_brown, w_wind = rng.dirichlet([2.0, 1.0, 1.0])
    # Independent Gaussian noises add their power spectra: one draw with the summed spectrum
    # is the same random process as the sum of a pink and a brown draw, at half the cost.
    f_ref = 1000.0
    static = _shaped_noise(
        rng, n, sr, lambda f: np.sqrt(w_pink**2 * f_ref / f + w_brown**2 * (f_ref / f) ** 2)
    )
    # Gusts: a slow random envelope drawn at 50 Hz and interpolated (cheap for long files).
    k = max(4, int(n / sr * 50))
    gust = np.clip(1 + 0.6 * _colored(rng, k, 2.0, 50, cutoff=0.5), 0.1, None)
    gust = np.interp(np.arange(n) / sr * 50, np.arange(k), gust)
    wind = _colored(rng, n, 1.0, sr, cutoff=rng.uniform(150, 400)) * gust
    x = static / (static.std() + 1e-12) * (w_pink + w_brown) + w_wind * wind
    return x / (x.std() + 1e-12)


def _distractor(rng: np.random.Generator, sr: int) -> np.ndarray:
    """An unlabelled sound: a leaf rustle (short band noise) or a distant engine hum."""
    if rng.random() < 0.5:
        n = int(rng.uniform(0.05, 0.3) * sr)
        x = _colored(rng, n, 0.5, sr, cutoff=rng.uniform(1500, 4000))
        return x * np.exp(-np.arange(n) / (0.3 * n))
    n = int(rng.uniform(1.0, 4.0) * sr)
    f0 = rng.uniform(40, 120)
    x = sum(_phase_tone(np.full(n, k * f0), sr) / k for k in range(1, 9) if k * f0 < 0.45 * sr)
    return x * np.hanning(n)


@dataclass
class Event:
    start: float
    end: float
    species: str
    low_freq: float
    high_freq: float


def _add(out: np.ndarray, x: np.ndarray, at: int) -> None:
    end = min(len(out), at + len(x))
    out[at:end] += x[: end - at]


def make_scene(
    rng: np.random.Generator,
    sr: int,
    seconds: float,
    species: Sequence[str],
    bouts: tuple[int, int] = (1, 3),
    distractor_p: float = 0.35,
) -> tuple[np.ndarray, list[Event]]:
    """A mono clip: background + `bouts` calls of each species at random times and SNRs.

    SNR (dB) = 10 log10(mean power of the call over its bout / mean power of the background).
    Returns (float32 samples, events sorted by start).
    """
    n = int(round(seconds * sr))
    level = 10 ** (rng.uniform(-45, -30) / 20)  # background RMS re full scale
    out = background(rng, sr, n) * level
    events = []
    for sp in species:
        for _ in range(int(rng.integers(bouts[0], bouts[1] + 1))):
            c = synth_call(sp, rng, sr)
            wave = c.wave[: max(1, n - int(0.1 * sr))]
            rms = math.sqrt(float(np.mean(wave**2))) or 1.0
            wave = wave * level * 10 ** (rng.uniform(*SNR_DB) / 20) / rms
            at = int(rng.uniform(0.05, max(0.05, seconds - len(wave) / sr - 0.05)) * sr)
            _add(out, wave, at)
            events.append(Event(at / sr, (at + len(wave)) / sr, sp, c.low_freq, c.high_freq))
    for _ in range(int(rng.random() < distractor_p) * int(rng.integers(1, 3))):
        d = _distractor(rng, sr)[: n // 2]
        _add(out, d * level * 10 ** (rng.uniform(0, 15) / 20), int(rng.integers(0, n - len(d) + 1)))
    peak = float(np.abs(out).max())
    if peak > 0.9:  # scale the whole clip, keeping every SNR
        out *= 0.9 / peak
    return out.astype(np.float32), sorted(events, key=lambda e: (e.start, e.species))


def _multichannel(rng: np.random.Generator, x: np.ndarray, channels: int) -> np.ndarray:
    """(samples, channels): each extra channel attenuated, with its own faint noise.

    No inter-channel delay: a delayed copy would comb-filter the mono down-mix.
    """
    cols = [x]
    for _ in range(channels - 1):
        y = x * rng.uniform(0.6, 1.0)
        y = y + 0.002 * rng.standard_normal(len(x))
        cols.append(y.astype(np.float32))
    return np.stack(cols, axis=1)


# ---------------------------------------------------------------------------------------------
# writing


def _ogg_crc_table() -> list[int]:
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else (r << 1)
        table.append(r & 0xFFFFFFFF)
    return table


_OGG_CRC = _ogg_crc_table()


def _ogg_fix_serial(path: Path, serial: int) -> None:
    """Set every Ogg page's stream serial number (libsndfile picks a random one) and re-CRC."""
    data = bytearray(path.read_bytes())
    pos = 0
    while pos < len(data):
        if data[pos : pos + 4] != b"OggS":
            raise RuntimeError(f"{path}: unexpected Ogg page layout at byte {pos}")
        nseg = data[pos + 26]
        size = 27 + nseg + sum(data[pos + 27 : pos + 27 + nseg])
        data[pos + 14 : pos + 18] = struct.pack("<I", serial)
        data[pos + 22 : pos + 26] = b"\0\0\0\0"
        crc = 0
        for b in data[pos : pos + size]:
            crc = ((crc << 8) & 0xFFFFFFFF) ^ _OGG_CRC[((crc >> 24) & 0xFF) ^ b]
        data[pos + 22 : pos + 26] = struct.pack("<I", crc)
        pos += size
    path.write_bytes(bytes(data))


def _write_audio(path: Path, x: np.ndarray, sr: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ext = path.suffix.lower()
    if ext == ".ogg":
        sf.write(str(path), x, sr, format="OGG", subtype="VORBIS")
        _ogg_fix_serial(path, serial=0x62696F61)  # 'bioa'
    else:
        sf.write(str(path), x, sr, subtype="PCM_16")


def _pick_format(i: int) -> str:
    """Mostly WAV; FLAC and OGG on a fixed cycle so even tiny trees hold each format."""
    return {1: ".flac", 3: ".flac", 6: ".flac", 8: ".flac", 5: ".ogg"}.get(i % 10, ".wav")


@dataclass
class LayoutSummary:
    path: Path
    files: int = 0
    seconds: float = 0.0
    description: str = ""


@dataclass
class DemoSummary:
    """What `generate_demo_data` wrote."""

    out: Path
    seed: int
    classes: list[str]
    layouts: dict[str, LayoutSummary]
    bytes: int = 0

    @property
    def files(self) -> int:
        return sum(s.files for s in self.layouts.values())

    @property
    def hours(self) -> float:
        return sum(s.seconds for s in self.layouts.values()) / 3600

    def format(self) -> str:
        lines = [
            f"demo data (seed {self.seed}): {self.files} audio files, {self.hours:.3f} h, "
            f"{self.bytes / 1e6:.1f} MB",
            f"classes ({len(self.classes)}): {', '.join(self.classes)}",
        ]
        for name, s in self.layouts.items():
            lines.append(f"  {name:<12} {s.files:>4} files {s.seconds / 60:6.1f} min  {s.path}")
            lines.append(f"  {'':<12} {s.description}")
        lines.append(f"description: {self.out / 'README.txt'}")
        return "\n".join(lines)


class _Builder:
    """Writes clips into one tree, counting files and seconds per layout."""

    def __init__(self, root: Path, seed: int, bar: Any):
        self.root, self.seed, self.bar = root, seed, bar
        self.layouts: dict[str, LayoutSummary] = {}

    def rng(self, layout: int, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, layout, i])

    def clip(
        self,
        layout: str,
        rel: str,
        rng: np.random.Generator,
        i: int,
        species: Sequence[str],
        seconds: tuple[float, float],
        bouts: tuple[int, int] = (1, 3),
    ) -> list[Event]:
        sr = int(rng.choice(SAMPLE_RATES, p=RATE_WEIGHTS))
        dur = round(float(rng.uniform(*seconds)), 2)
        x, events = make_scene(rng, sr, dur, species, bouts)
        if i % 12 == 6:
            x = _multichannel(rng, x, 2)
        path = self.root / layout / f"{rel}{_pick_format(i)}"
        _write_audio(path, x, sr)
        s = self.layouts[layout]
        s.files += 1
        s.seconds += len(x) / sr
        self.bar.update(1)
        return events


def _readme(cfg: DemoDataConfig, n_multi: int, n_pairs: int) -> str:
    species = "\n".join(f"  {k:<14} {v}" for k, v in SPECIES.items())
    return f"""bioaudio demo data (synthetic; seed {cfg.seed}; generated by `bioaudio demo-data`)

Six made-up species with distinct call shapes, called at random times over pink / brown
noise, wind rumble and distractors (leaf rustles, engine hum) at SNRs from -5 to 20 dB.
Sample rates {", ".join(map(str, SAMPLE_RATES))} Hz; WAV (16-bit), FLAC and OGG;
a few 2-channel files. The same seed and options always give the same bytes.

Classes:
{species}

Layouts (each one is a `bioaudio prepare` input; see data/README.md of the project):
  unlabelled/   {cfg.n_unlabelled} clips of 1-8 s in a site/date tree, 0-2 species or noise only.
                bioaudio prepare unlabelled            (layout: none)
  labelled/     labels.csv (filename,labels) + audio/, {cfg.n_per_class // 2 or 1} clips per species
                and {n_multi} clips with two species ("a,b" in quotes, multi-label).
                bioaudio prepare labelled              (layout: csv)
  by_class/     <species>/ folders, {cfg.n_per_class} clips of 2-5 s each.
                bioaudio prepare by_class              (layout: folders)
  soundscapes/  {cfg.soundscapes} recordings of 60-90 s, calls of several species, each with a Raven
                selection table <stem>.Table.1.selections.txt; the first also has an Audacity label
                track <stem>.txt with the same calls.
                bioaudio prepare soundscapes           (layout: selections, 5 s windows)
  pairs/        positive/ ({n_pairs} clips with {PAIR_TARGET}) and negative/ ({n_pairs} clips without).
                bioaudio prepare pairs                 (layout: pairs)
"""


def _is_demo_dir(out: Path) -> bool:
    try:
        return json.loads((out / MARKER).read_text()).get("format") == FORMAT_TAG
    except (OSError, ValueError, AttributeError):
        return False


def generate_demo_data(
    out: str | Path,
    seed: int = 0,
    n_per_class: int = 16,
    n_unlabelled: int = 32,
    soundscapes: int = 3,
    force: bool = False,
    progress: bool = False,
) -> DemoSummary:
    """Write the demo dataset into `out` and return what was written.

    `out` must be absent, empty, or a previous demo-data output (the files it wrote, listed in
    its marker, are then replaced; files added since are kept); anything else needs `force=True`. Files are written into a temporary folder
    beside `out` and moved in at the end, so an interrupted run leaves `out` as it was.
    """
    cfg = DemoDataConfig(seed, n_per_class, n_unlabelled, soundscapes, force)
    cfg.validate()
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not _is_demo_dir(out) and not force:
        raise ConfigError(
            f"output {out} is not empty and is not a previous demo-data output; "
            "choose another folder or pass --force (the demo files are written into "
            f"{', '.join(o for o in OWNED if not o.startswith('.'))}; other files are kept)"
        )
    from tqdm.auto import tqdm

    species = list(SPECIES)
    n_single = max(1, n_per_class // 2)
    n_multi = max(2, len(species) * n_per_class // 8)
    n_pairs = max(2, n_per_class // 2)
    total = (
        n_unlabelled + len(species) * (n_per_class + n_single) + n_multi + 2 * n_pairs + soundscapes
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with tqdm(total=total, desc="writing demo audio", unit="file", disable=not progress) as bar:
            b = _Builder(tmp, seed, bar)
            descriptions = {
                "unlabelled": "nested site/date tree, no labels",
                "labelled": "labels.csv (filename,labels), multi-label rows quoted",
                "by_class": "one folder per species",
                "soundscapes": "long recordings + Raven tables (+ one Audacity track)",
                "pairs": f"positive/ has {PAIR_TARGET}, negative/ does not",
            }
            for name in LAYOUTS:
                b.layouts[name] = LayoutSummary(out / name, description=descriptions[name])
                (tmp / name).mkdir(parents=True)
            _unlabelled(b, n_unlabelled, species)
            _labelled(b, n_single, n_multi, species)
            _by_class(b, n_per_class, species)
            _soundscapes(b, soundscapes, species)
            _pairs(b, n_pairs, species)
        (tmp / "README.txt").write_text(_readme(cfg, n_multi, n_pairs))
        marker = {"format": FORMAT_TAG, "version": FORMAT_VERSION, "classes": species}
        marker.update({k: v for k, v in vars(cfg).items() if k != "force"})
        # Every file this run writes: a later run replaces these and nothing else.
        marker["files"] = sorted(
            p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file()
        )
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        _move_into(tmp, out, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return DemoSummary(out, seed, species, b.layouts, size)


def _written_before(out: Path) -> set[str] | None:
    """The files a previous demo-data run wrote into `out` (its marker's list); None when the
    marker predates the list (or is absent)."""
    try:
        files = json.loads((out / MARKER).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    return {str(f) for f in files} if isinstance(files, list) else None


def _move_into(tmp: Path, out: Path, force: bool = False) -> None:
    """Move the new files from `tmp` into `out`. Only files demo-data wrote before (listed in
    its marker) are replaced or removed; files the user added are kept. A user's file where a
    demo file goes is refused (before anything changes) unless `force`."""
    if not out.exists():
        tmp.rename(out)
        return
    new = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    before = _written_before(out)
    always = {"README.txt", MARKER}
    if before is not None and not force:
        theirs = [f for f in new if f not in before and f not in always and (out / f).exists()]
        if theirs:
            raise ConfigError(
                f"{out / theirs[0]} was not written by demo-data and a demo file goes there; "
                "move it away or pass --force to replace it"
            )
    for rel in sorted(before or ()):  # our old files (a smaller run leaves fewer)
        dst = out / rel
        if dst.is_file() or dst.is_symlink():
            dst.unlink()
    for rel in new:
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_dir() and not dst.is_symlink():
            raise ConfigError(f"{dst} is a folder where demo-data writes a file; move it away")
        os.replace(tmp / rel, dst)


# ---------------------------------------------------------------------------------------------
# the layouts


def _unlabelled(b: _Builder, n: int, species: list[str]) -> None:
    for i in range(n):
        rng = b.rng(1, i)
        site = "site_A" if i % 2 == 0 else "site_B"
        day = 1 + (i // 2) % 3
        minutes = 5 * 60 + 15 * (i // 6)  # a recorder schedule: one clip per 15 min from 05:00
        k = int(rng.choice([0, 1, 1, 2]))
        calls = [species[j] for j in rng.choice(len(species), k, replace=False)]
        stamp = f"2024050{day}_{minutes // 60 % 24:02d}{minutes % 60:02d}00"
        rel = f"{site}/2024-05-0{day}/{site}_{stamp}"
        b.clip("unlabelled", rel, rng, i, calls, (1.0, 8.0))


def _labelled(b: _Builder, n_single: int, n_multi: int, species: list[str]) -> None:
    rows: list[tuple[str, str]] = []
    plan = [[sp] for _ in range(n_single) for sp in species]
    rng_plan = b.rng(2, 10_000)
    for _ in range(n_multi):
        pair = rng_plan.choice(len(species), 2, replace=False)
        plan.append([species[j] for j in sorted(pair)])
    order = rng_plan.permutation(len(plan))  # so file names do not give the class away
    for i, j in enumerate(order):
        rng = b.rng(2, i)
        rel = f"audio/clip_{i:03d}"
        b.clip("labelled", rel, rng, i, plan[j], (2.0, 5.0), bouts=(1, 2))
        ext = _pick_format(i)
        rows.append((f"{rel}{ext}", ",".join(plan[j])))
    path = b.root / "labelled" / "labels.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["filename", "labels"])
        w.writerows(rows)


def _by_class(b: _Builder, n: int, species: list[str]) -> None:
    for s, sp in enumerate(species):
        for i in range(n):
            k = s * n + i
            b.clip("by_class", f"{sp}/{sp}_{i:03d}", b.rng(3, k), k, [sp], (2.0, 5.0))


def _pairs(b: _Builder, n: int, species: list[str]) -> None:
    others = [sp for sp in species if sp != PAIR_TARGET]
    for i in range(n):
        rng = b.rng(5, i)
        extra = [others[int(rng.integers(len(others)))]] if rng.random() < 0.4 else []
        b.clip("pairs", f"positive/pos_{i:03d}", rng, i, [PAIR_TARGET, *extra], (2.0, 4.0))
    for i in range(n):
        rng = b.rng(6, i)
        calls = [others[int(rng.integers(len(others)))]] if rng.random() < 0.7 else []
        b.clip("pairs", f"negative/neg_{i:03d}", rng, n + i, calls, (2.0, 4.0))


RAVEN_COLUMNS = [
    "Selection",
    "View",
    "Channel",
    "Begin Time (s)",
    "End Time (s)",
    "Low Freq (Hz)",
    "High Freq (Hz)",
    "Delta Time (s)",
    "Begin File",
    "Species",
]


def _soundscapes(b: _Builder, n: int, species: list[str]) -> None:
    rates = (22050, 32000, 16000)
    for i in range(n):
        rng = b.rng(4, i)
        sr = rates[i % len(rates)]
        seconds = round(float(rng.uniform(60, 90)), 1)
        nsamp = int(round(seconds * sr))
        level = 10 ** (rng.uniform(-42, -32) / 20)
        x = background(rng, sr, nsamp) * level
        # about one bout every 4 s, from a few species that favour this site
        weights = rng.dirichlet(np.ones(len(species)) * 0.8)
        events: list[Event] = []
        for _ in range(int(rng.poisson(seconds / 4))):
            sp = species[int(rng.choice(len(species), p=weights))]
            c = synth_call(sp, rng, sr)
            rms = math.sqrt(float(np.mean(c.wave**2))) or 1.0
            wave = c.wave * level * 10 ** (rng.uniform(*SNR_DB) / 20) / rms
            at = int(rng.uniform(0.2, seconds - len(wave) / sr - 0.2) * sr)
            _add(x, wave, at)
            events.append(Event(at / sr, (at + len(wave)) / sr, sp, c.low_freq, c.high_freq))
        for _ in range(int(rng.poisson(seconds / 15))):
            d = _distractor(rng, sr)
            _add(
                x, d * level * 10 ** (rng.uniform(0, 15) / 20), int(rng.integers(0, nsamp - len(d)))
            )
        peak = float(np.abs(x).max())
        if peak > 0.9:
            x *= 0.9 / peak
        x = x.astype(np.float32)
        if i == 2:
            x = _multichannel(rng, x, 2)
        stem = f"soundscape_{i + 1:02d}"
        folder = b.root / "soundscapes"
        ext = ".flac" if i % 3 == 1 else ".wav"  # long FLAC: exercises seeking in FLAC
        _write_audio(folder / f"{stem}{ext}", x, sr)
        events.sort(key=lambda e: (e.start, e.species))
        with open(folder / f"{stem}.Table.1.selections.txt", "w", newline="") as f:
            w = csv.writer(f, delimiter="\t", lineterminator="\n")
            w.writerow(RAVEN_COLUMNS)
            for k, e in enumerate(events, start=1):
                for view in ("Waveform 1", "Spectrogram 1"):
                    w.writerow(
                        [k, view, 1, f"{e.start:.6f}", f"{e.end:.6f}", f"{e.low_freq:.1f}",
                         f"{e.high_freq:.1f}", f"{e.end - e.start:.6f}", f"{stem}{ext}", e.species]
                    )  # fmt: skip
        if i == 0:
            with open(folder / f"{stem}.txt", "w", newline="") as f:
                for e in events:
                    f.write(f"{e.start:.6f}\t{e.end:.6f}\t{e.species}\n")
                    f.write(f"\\\t{e.low_freq:.1f}\t{e.high_freq:.1f}\n")
        s = b.layouts["soundscapes"]
        s.files += 1
        s.seconds += nsamp / sr
        b.bar.update(1)
